"""Fused linear + cross-entropy: the summed next-token loss of ``hidden @ W.T`` and its gradient
w.r.t. ``hidden`` (and ``W`` when it trains), computed over token chunks so that the
``[tokens, vocab]`` logits never exist whole (Liger-Kernel's FusedLinearCrossEntropy is the idea).

Per chunk of ``C`` target tokens (on the CPU route ignored tokens are dropped before the first
chunk; on the GPU route they stay, score 0 and get a zero gradient, since dropping them would make
the host wait for their count):
  1. logits = h_c @ W.T in the compute dtype (the autocast dtype if autocast is on, as HF's head
     would run), through :func:`bytetune.kernels.int8_head.weight_only_matmul` for an int8 head;
  2. per row: loss = logsumexp(logits) - logits[target], and the logits buffer is overwritten in
     place by d loss / d logits = softmax(logits) - onehot(target): the Triton kernel
     (:func:`cross_entropy_rows_triton`, two passes with an online max/sum) or its PyTorch
     reference (:func:`cross_entropy_rows_reference`);
  3. grad_h_c = grad_logits @ W (``int8_matmul_grad_input`` for an int8 head), and
     grad_W += grad_logits.T @ h_c only when W requires grad.
The gradients are computed in the forward (the loss is a sum, so backward only scales them by
the incoming scalar): one pass over the head weight instead of two.

Memory beyond the hidden states (for a planner; C = chunk tokens, V = vocab, H = hidden,
b = bytes of the compute dtype, N = target tokens):
  - grad_hidden, held from forward to backward: N x H x b_hidden (as big as the hidden states);
  - when some targets are ignored, the selected rows: N x H x b_hidden (the trainer's shift
    ``hidden[:, :-1].reshape`` is one more such copy);
  - a float head whose dtype is not the compute dtype: one cast copy, V x H x b;
  - per chunk, transient: logits C x V x b; the reference CE adds C x V x 4 (its float32
    exp/logsumexp temporaries) and, for b < 4, another C x V x 4 (the float32 upcast); the Triton
    CE kernel works in place and adds nothing;
  - int8 head, reference matmul: C x H x 4 + 4096 x H x 4 (one dequantized slab of rows);
  - a trainable W: V x H x 4 (its float32 gradient).
Default chunk (:func:`default_chunk_tokens`): logits of one chunk about the size of the hidden
states, at least :data:`MIN_CHUNK_TOKENS` tokens (:data:`MIN_CHUNK_TOKENS_CPU` on a CPU).
"""

from __future__ import annotations

import math

import torch

from bytetune.kernels import _ops
from bytetune.kernels.backends.registry import runs_triton
from bytetune.kernels.dispatch import HAS_TRITON, launch_device
from bytetune.kernels.int8_head import int8_matmul_grad_input, weight_only_matmul

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = [
    "CE_GPU_CONFIG",
    "CE_INTERPRETER_CONFIG",
    "MIN_CHUNK_TOKENS",
    "MIN_CHUNK_TOKENS_CPU",
    "cross_entropy_rows",
    "cross_entropy_rows_reference",
    "cross_entropy_rows_triton",
    "default_chunk_tokens",
    "fused_linear_cross_entropy",
]

from bytetune.kernels.constants import IGNORE_INDEX  # noqa: E402  (one home: kernels/constants.py)
MIN_CHUNK_TOKENS = 32
# On a CPU a GEMM of a few dozen rows against the whole vocabulary runs far below the BLAS's
# speed: SmolLM2's loss (508 tokens, 49,152 ids, 2 cores) took 602 ms forward + backward in
# 32-token chunks, 449 ms in 128-token ones and 467 ms from whole logits. CPU chunks are at least
# this many tokens (their logits: 25 MB at that vocabulary).
MIN_CHUNK_TOKENS_CPU = 128
# Launch configs of the per-row CE kernel (one program per token row, BLOCK_V vocab entries per
# iteration). Explicit, so a compile gate can enumerate them.
CE_GPU_CONFIG = dict(BLOCK_V=4096, num_warps=16)
CE_INTERPRETER_CONFIG = dict(BLOCK_V=1024)


def default_chunk_tokens(n_tokens: int, hidden: int, vocab: int, on_cpu: bool = False) -> int:
    """Tokens per chunk so that a chunk's logits (C x V) are about the hidden states' size (N x H),
    and at least :data:`MIN_CHUNK_TOKENS` (``on_cpu``: :data:`MIN_CHUNK_TOKENS_CPU`)."""
    n_chunks = max(1, math.ceil(vocab / max(hidden, 1)))
    chunk = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n_tokens / n_chunks)))))
    floor = MIN_CHUNK_TOKENS_CPU if on_cpu else MIN_CHUNK_TOKENS
    return max(1, min(n_tokens, max(floor, chunk)))


def _check_rows(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D float tensor [rows, vocab], got shape {tuple(logits.shape)} dtype {logits.dtype}")
    if targets.shape != (logits.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 of shape ({logits.shape[0]},), got shape {tuple(targets.shape)} dtype {targets.dtype}")
    if not logits.is_contiguous():
        raise ValueError("logits must be contiguous: the gradient is written into them in place")


def cross_entropy_rows_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row CE (float32) of ``logits`` [rows, V] against ``targets``; overwrites ``logits``
    in place with the gradient softmax - onehot (in its own dtype).

    A negative target marks an ignored row (loss 0, gradient 0); a target >= V is an error the
    device cannot raise without making the host wait, so its row's loss and gradient are NaN."""
    _check_rows(logits, targets)
    vocab = logits.shape[1]
    as_float = logits.float()  # the buffer itself when logits are float32
    log_normalizer = torch.logsumexp(as_float, dim=-1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    safe_targets = targets.clamp(0, vocab - 1)
    loss = log_normalizer - as_float[rows, safe_targets]
    as_float.sub_(log_normalizer[:, None]).exp_()
    as_float[rows, safe_targets] -= 1.0
    ignored, out_of_range = targets < 0, targets >= vocab
    # On a CPU the check is free and spares two passes over the gradient; a GPU masks always.
    if logits.is_cuda or bool((ignored | out_of_range).any()):
        loss = loss.masked_fill(out_of_range, float("nan")).masked_fill(ignored, 0.0)
        as_float.masked_fill_(out_of_range[:, None], float("nan")).masked_fill_(ignored[:, None], 0.0)
    if as_float.data_ptr() != logits.data_ptr():
        logits.copy_(as_float)
    return loss


if HAS_TRITON:

    @triton.jit
    def _cross_entropy_rows_kernel(logits_ptr, stride_row, targets_ptr, loss_ptr, V, BLOCK_V: tl.constexpr):
        # Pass 1: online max and sum of exp (one read of the row); pass 2: the gradient, written
        # over the logits (one more read and one write). Everything in float32.
        # A negative target: an ignored row (loss 0, gradient 0); one >= V: NaN (the reference's rule).
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row).to(tl.int64)
        ignored = target < 0
        out_of_range = target >= V
        target = tl.where(ignored | out_of_range, 0, target)
        running_max = tl.full([], float("-inf"), tl.float32)
        running_sum = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        log_normalizer = running_max + tl.log(running_sum)
        target_logit = tl.load(row_ptr + target).to(tl.float32)
        loss = tl.where(out_of_range, float("nan"), log_normalizer - target_logit)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp(x - log_normalizer)
            grad = tl.where(cols == target, grad - 1.0, grad)
            grad = tl.where(out_of_range, float("nan"), grad)
            grad = tl.where(ignored, 0.0, grad)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def cross_entropy_rows_triton(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    _check_rows(logits, targets)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: call cross_entropy_rows_reference")
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0] == 0:
        return loss
    config = CE_GPU_CONFIG if logits.is_cuda else CE_INTERPRETER_CONFIG
    with launch_device(logits):
        _cross_entropy_rows_kernel[(logits.shape[0],)](
            logits, logits.stride(0), targets, loss, logits.shape[1], **config
        )
    return loss


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row float32 CE; ``logits`` is overwritten with d(sum of the CE)/d(logits)."""
    return _ops.cross_entropy_rows(logits, targets)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on (as nn.Linear would)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """sum over rows of CE(hidden @ W.T, targets); a negative target scores 0 (cross_entropy_rows)."""

    @staticmethod
    def forward(ctx, hidden, weight, w_int8, w_scale, targets, chunk_tokens, compute_dtype, needs_grad):
        n_tokens = hidden.shape[0]
        weight_trains = weight is not None and weight.requires_grad and needs_grad
        with torch.autocast(hidden.device.type, enabled=False):
            # One cast of a float head to the compute dtype (a no-op for a 16-bit model under
            # 16-bit autocast), not one per chunk.
            w = weight.to(compute_dtype) if weight is not None else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if needs_grad else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_trains else None
            for start in range(0, n_tokens, chunk_tokens):
                stop = min(start + chunk_tokens, n_tokens)
                h_chunk = hidden[start:stop].to(compute_dtype)
                logits = h_chunk @ w.t() if w is not None else weight_only_matmul(h_chunk, w_int8, w_scale)
                loss += cross_entropy_rows(logits, targets[start:stop]).sum()
                if not needs_grad:
                    continue
                grad_logits = logits  # overwritten in place by the CE op
                if w is not None:
                    grad_hidden[start:stop] = grad_logits @ w
                else:
                    grad_hidden[start:stop] = int8_matmul_grad_input(grad_logits, w_int8, w_scale)
                if weight_trains:
                    grad_weight.addmm_(grad_logits.t().float(), h_chunk.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype if weight is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is None:
            raise RuntimeError("fused_linear_cross_entropy ran without gradients (no_grad or frozen inputs)")
        grad_h = (grad_hidden * grad_loss.to(grad_hidden.dtype)) if ctx.needs_input_grad[0] else None
        grad_w = None
        if grad_weight is not None and ctx.needs_input_grad[1]:
            grad_w = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None = None,
    w_int8: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Sum over tokens of CE(hidden @ W.T, targets) in float32, never holding [tokens, vocab] logits.

    ``hidden`` [N, H] float; ``targets`` [N] int64 (``ignore_index`` rows score nothing);
    the head is either a float ``weight`` [V, H] or an int8 ``w_int8`` [V, H] with float32 row
    absmax ``w_scale`` [V]. Differentiable in ``hidden`` and in ``weight`` when it requires grad.
    ``chunk_tokens``: tokens per chunk (default :func:`default_chunk_tokens`).

    Nothing here waits for the device on the GPU route (CUDA tensors, or any tensor under
    ``BYTETUNE_FORCE_TRITON``): ignored rows go through the head and score 0 instead of being
    dropped (their count is data), and a target outside [0, vocab) makes the loss NaN instead of
    raising (the non-finite-step guard stops the run); the CPU route drops them and raises.
    """
    if (weight is None) == (w_int8 is None):
        raise ValueError("pass exactly one head: a float `weight` or an int8 `w_int8` with its `w_scale`")
    if w_int8 is not None and w_scale is None:
        raise ValueError("an int8 head needs its float32 row scales: pass w_scale")
    head = weight if weight is not None else w_int8
    if hidden.dim() != 2 or hidden.shape[1] != head.shape[1]:
        raise ValueError(
            f"hidden must be [tokens, {head.shape[1]}] (the head is {tuple(head.shape)} = [vocab, hidden]), "
            f"got {tuple(hidden.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    vocab = head.shape[0]
    if runs_triton(hidden.device):
        # The GPU route: the CE op's own marks, -1 = ignored and vocab = out of range (NaN loss).
        targets = torch.where(targets == ignore_index, -1, torch.where(targets < 0, vocab, targets))
    else:
        # On a CPU reading the data costs nothing: ignored tokens never reach the head, and a bad
        # target is an error at once.
        valid = targets != ignore_index
        if not bool(valid.all()):
            hidden, targets = hidden[valid], targets[valid]
        if bool(((targets < 0) | (targets >= vocab)).any()):
            raise ValueError(f"targets must be in [0, {vocab}) or {ignore_index}")
    n_tokens = hidden.shape[0]
    if n_tokens == 0:
        return (hidden.sum() * 0.0).float()  # keeps the graph connected (DDP sees every input used)
    chunk = chunk_tokens or default_chunk_tokens(n_tokens, head.shape[1], vocab, on_cpu=hidden.device.type == "cpu")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or (weight is not None and weight.requires_grad))
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, w_int8, w_scale, targets.contiguous(), chunk, _compute_dtype(hidden), needs_grad
    )
