"""Fused 8-bit optimizer updates: Adam/AdamW, momentum SGD (optionally Nesterov) and Lion.

One Triton program owns one block of ``block_size`` elements and, in a single pass over memory,
loads the gradient, the parameter and the uint8 state codes, dequantizes the states through the
256-entry code maps, updates states and parameter in fp32, takes the new per-block absmax of the
fp32 states, requantizes them (nearest code) and stores codes, absmax and parameter. The fp32
states only ever live in registers.

The parameter update uses the fp32 states before requantization (as in arXiv 2110.02861).

Non-finite gradients: an element whose gradient is inf or nan gets its optimizer states set to 0
and its parameter left unchanged (no weight decay either), so it can never poison the absmax and
hence the codes of the other elements of its block (bitsandbytes' rule).

The same update math, written in PyTorch, is the reference: ``optimizer_update_reference`` runs it
on fp32 states (the 32-bit path) and ``optimizer_update_8bit_reference`` wraps it in block-wise
dequantize / quantize (the CPU 8-bit path and the tests' oracle).
"""

from __future__ import annotations

import dataclasses
import enum

import torch

from bytetune.kernels.blockwise import (
    DEFAULT_BLOCK_SIZE,
    HAS_TRITON,
    _as_blocks,
    check_block_size,
    dequantize_blocks_reference,
    n_blocks,
    quantize_blocks_reference,
)
from bytetune.kernels.dispatch import require_triton, use_triton
from bytetune.kernels.quant_maps import code_midpoints

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.blockwise import nearest_code


class UpdateKind(enum.IntEnum):
    ADAM = 0  # two states: m (signed map) and v (unsigned map)
    MOMENTUM = 1  # one state: the momentum buffer (signed map)
    LION = 2  # one state: m (signed map)


N_STATES = {UpdateKind.ADAM: 2, UpdateKind.MOMENTUM: 1, UpdateKind.LION: 1}


@dataclasses.dataclass(frozen=True)
class UpdateScalars:
    """Per-step float scalars of the update, precomputed in float64 by the optimizer so both
    implementations see the same float32 values (a kernel computing ``1 - beta1`` in float32
    would round differently).

    Adam:     m = beta1 m + one_minus_beta1 g;  v = beta2 v + one_minus_beta2 g^2;
              p = p * param_decay - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
    Momentum: buf = beta1 buf + one_minus_beta1 g  (beta1 = momentum, one_minus_beta1 =
              1 - dampening; 0 and 1 on the first step, where torch sets buf = g);
              p = p - lr * (g + momentum buf if Nesterov else buf)
    Lion:     p = p * param_decay - lr * sign(beta1 m + one_minus_beta1 g);
              m = beta2 m + one_minus_beta2 g
    Every kind first adds ``l2_decay * p`` to the gradient (torch's L2 weight decay).
    """

    lr: float = 0.0
    beta1: float = 0.0
    one_minus_beta1: float = 1.0
    beta2: float = 0.0
    one_minus_beta2: float = 1.0
    eps: float = 0.0
    l2_decay: float = 0.0
    param_decay: float = 1.0
    step_size: float = 0.0
    bias_correction2_sqrt: float = 1.0
    momentum: float = 0.0


# ---------------------------------------------------------------- PyTorch reference


def _f32(x: float) -> torch.Tensor:
    # Scalars as float32 0-d tensors: the same rounding of each constant as the kernel's arguments.
    return torch.tensor(x, dtype=torch.float32)


def optimizer_update_reference(
    kind: UpdateKind,
    scalars: UpdateScalars,
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor | None = None,
    nesterov: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The update on fp32 tensors of one shape; returns (new param, new state1, new state2)."""
    s = {f.name: _f32(getattr(scalars, f.name)) for f in dataclasses.fields(scalars)}
    finite = torch.isfinite(grad)
    g = grad + s["l2_decay"] * param
    new_state2 = None
    if kind == UpdateKind.ADAM:
        m = s["beta1"] * state1 + s["one_minus_beta1"] * g
        v = s["beta2"] * state2 + s["one_minus_beta2"] * (g * g)
        denom = torch.sqrt(v) / s["bias_correction2_sqrt"] + s["eps"]
        new_param = param * s["param_decay"] - s["step_size"] * (m / denom)
        new_state1 = m
        new_state2 = torch.where(finite, v, 0.0)
    elif kind == UpdateKind.MOMENTUM:
        buf = s["beta1"] * state1 + s["one_minus_beta1"] * g
        direction = g + s["momentum"] * buf if nesterov else buf
        new_param = param - s["lr"] * direction
        new_state1 = buf
    elif kind == UpdateKind.LION:
        interpolated = s["beta1"] * state1 + s["one_minus_beta1"] * g
        new_param = param * s["param_decay"] - s["lr"] * torch.sign(interpolated)
        new_state1 = s["beta2"] * state1 + s["one_minus_beta2"] * g
    else:
        raise ValueError(f"unknown update kind {kind!r}")
    new_state1 = torch.where(finite, new_state1, 0.0)
    new_param = torch.where(finite, new_param, param)
    return new_param, new_state1, new_state2


def optimizer_update_8bit_reference(
    kind: UpdateKind,
    scalars: UpdateScalars,
    param: torch.Tensor,
    grad: torch.Tensor,
    codes1: torch.Tensor,
    absmax1: torch.Tensor,
    map1: torch.Tensor,
    codes2: torch.Tensor | None = None,
    absmax2: torch.Tensor | None = None,
    map2: torch.Tensor | None = None,
    nesterov: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """In place: dequantize the block-wise states, update in fp32, requantize, write the param."""
    _check_update_args(kind, param, grad, codes1, absmax1, codes2, absmax2, block_size)
    numel = param.numel()
    p = _as_blocks(param.detach().reshape(-1).float(), block_size)
    g = _as_blocks(grad.reshape(-1).float(), block_size)
    s1 = _dequantize_state(codes1, absmax1, map1, block_size)
    s2 = _dequantize_state(codes2, absmax2, map2, block_size) if kind == UpdateKind.ADAM else None
    new_p, new_s1, new_s2 = optimizer_update_reference(kind, scalars, p, g, s1, s2, nesterov)
    q1, a1 = quantize_blocks_reference(new_s1, code_midpoints(map1))
    codes1.reshape(-1).copy_(q1.reshape(-1)[:numel])
    absmax1.copy_(a1)
    if kind == UpdateKind.ADAM:
        q2, a2 = quantize_blocks_reference(new_s2, code_midpoints(map2))
        codes2.reshape(-1).copy_(q2.reshape(-1)[:numel])
        absmax2.copy_(a2)
    param.detach().copy_(new_p.reshape(-1)[:numel].reshape(param.shape))


def _dequantize_state(codes, absmax, code_map, block_size) -> torch.Tensor:
    """fp32 [n_blocks, block] states; the padding of a ragged last block is 0 (its code 0 would
    dequantize to -0.99 * absmax and leak into the new absmax)."""
    states = dequantize_blocks_reference(_as_blocks(codes.reshape(-1), block_size), absmax, code_map)
    states.view(-1)[codes.numel() :] = 0.0
    return states


def _check_update_args(kind, param, grad, codes1, absmax1, codes2, absmax2, block_size) -> None:
    check_block_size(block_size)
    if grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from param shape {tuple(param.shape)}")
    states = [(codes1, absmax1)] + ([(codes2, absmax2)] if N_STATES[kind] == 2 else [])
    for codes, absmax in states:
        if codes is None or codes.dtype != torch.uint8 or codes.numel() != param.numel():
            raise ValueError("state codes must be a uint8 tensor with as many elements as the param")
        if absmax.dtype != torch.float32 or absmax.numel() != n_blocks(param.numel(), block_size):
            raise ValueError(
                f"absmax must be float32 with one entry per block of {block_size} elements "
                f"({n_blocks(param.numel(), block_size)}), got {absmax.numel()} {absmax.dtype}"
            )


# ---------------------------------------------------------------- Triton kernel

if HAS_TRITON:

    @triton.jit
    def _dequantize(codes_ptr, absmax_ptr, map_ptr, block, offsets, in_bounds):
        code = tl.load(codes_ptr + offsets, mask=in_bounds, other=0).to(tl.int32)
        # Lanes past the end must hold 0, not code 0 (-0.99 * absmax), or they set the new absmax.
        return tl.where(in_bounds, tl.load(map_ptr + code) * tl.load(absmax_ptr + block), 0.0)

    @triton.jit
    def _requantize(state, codes_ptr, absmax_ptr, midpoints_ptr, block, offsets, in_bounds):
        # Out-of-bounds lanes hold 0 (zero gradient, zero state), so they never set the absmax.
        absmax = tl.max(tl.abs(state), axis=0)
        scale = tl.where(absmax > 0, absmax, 1.0)
        code = nearest_code(state / scale, midpoints_ptr)
        tl.store(codes_ptr + offsets, code.to(tl.uint8), mask=in_bounds)
        tl.store(absmax_ptr + block, absmax)

    @triton.jit
    def _optimizer_update_8bit_kernel(
        param_ptr, grad_ptr,
        codes1_ptr, absmax1_ptr, map1_ptr, midpoints1_ptr,
        codes2_ptr, absmax2_ptr, map2_ptr, midpoints2_ptr,
        numel,
        lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        l2_decay, param_decay, step_size, bias_correction2_sqrt, momentum,
        KIND: tl.constexpr, NESTEROV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        offsets = block.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_bounds = offsets < numel
        param = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        # NaN fails every comparison, so this is false for inf and nan alike.
        finite = tl.abs(grad) < float("inf")
        g = grad + l2_decay * param
        s1 = _dequantize(codes1_ptr, absmax1_ptr, map1_ptr, block, offsets, in_bounds)
        if KIND == 0:  # Adam / AdamW
            s2 = _dequantize(codes2_ptr, absmax2_ptr, map2_ptr, block, offsets, in_bounds)
            m = beta1 * s1 + one_minus_beta1 * g
            v = beta2 * s2 + one_minus_beta2 * (g * g)
            denom = tl.sqrt_rn(v) / bias_correction2_sqrt + eps
            new_param = param * param_decay - step_size * (m / denom)
            new_s1 = m
            new_s2 = tl.where(finite, v, 0.0)
            _requantize(new_s2, codes2_ptr, absmax2_ptr, midpoints2_ptr, block, offsets, in_bounds)
        elif KIND == 1:  # momentum SGD
            buf = beta1 * s1 + one_minus_beta1 * g
            if NESTEROV:
                direction = g + momentum * buf
            else:
                direction = buf
            new_param = param - lr * direction
            new_s1 = buf
        else:  # Lion
            interpolated = beta1 * s1 + one_minus_beta1 * g
            sign = tl.where(interpolated > 0, 1.0, tl.where(interpolated < 0, -1.0, 0.0))
            new_param = param * param_decay - lr * sign
            new_s1 = beta2 * s1 + one_minus_beta2 * g
        new_s1 = tl.where(finite, new_s1, 0.0)
        _requantize(new_s1, codes1_ptr, absmax1_ptr, midpoints1_ptr, block, offsets, in_bounds)
        new_param = tl.where(finite, new_param, param)
        tl.store(param_ptr + offsets, new_param.to(param_ptr.dtype.element_ty), mask=in_bounds)


def num_warps_for(block_size: int) -> int:
    """Warps per program: 128 elements per warp (4 per thread), at most 8 warps."""
    return max(1, min(8, block_size // 128))


def optimizer_update_8bit_triton(
    kind: UpdateKind,
    scalars: UpdateScalars,
    param: torch.Tensor,
    grad: torch.Tensor,
    codes1: torch.Tensor,
    absmax1: torch.Tensor,
    map1: torch.Tensor,
    codes2: torch.Tensor | None = None,
    absmax2: torch.Tensor | None = None,
    map2: torch.Tensor | None = None,
    nesterov: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """In place, same contract as :func:`optimizer_update_8bit_reference`; all tensors contiguous."""
    require_triton()
    _check_update_args(kind, param, grad, codes1, absmax1, codes2, absmax2, block_size)
    for name, t in (("param", param), ("grad", grad), ("codes1", codes1), ("codes2", codes2)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the fused kernel; call .contiguous()")
    if param.numel() == 0:
        return
    if kind != UpdateKind.ADAM:  # one-state optimizers: the second pointers are never read
        codes2, absmax2, map2 = codes1, absmax1, map1
    _optimizer_update_8bit_kernel[(absmax1.numel(),)](
        param.detach(), grad,
        codes1, absmax1, map1, code_midpoints(map1),
        codes2, absmax2, map2, code_midpoints(map2),
        param.numel(),
        *(getattr(scalars, f.name) for f in dataclasses.fields(scalars)),
        KIND=int(kind), NESTEROV=bool(nesterov), BLOCK_SIZE=block_size,
        num_warps=num_warps_for(block_size),
    )  # fmt: skip


def optimizer_update_8bit(
    kind: UpdateKind,
    scalars: UpdateScalars,
    param: torch.Tensor,
    grad: torch.Tensor,
    codes1: torch.Tensor,
    absmax1: torch.Tensor,
    map1: torch.Tensor,
    codes2: torch.Tensor | None = None,
    absmax2: torch.Tensor | None = None,
    map2: torch.Tensor | None = None,
    nesterov: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """The fused 8-bit update in place: Triton on CUDA tensors, the reference elsewhere."""
    impl = optimizer_update_8bit_triton if use_triton(param) else optimizer_update_8bit_reference
    impl(kind, scalars, param, grad, codes1, absmax1, map1, codes2, absmax2, map2, nesterov, block_size)
