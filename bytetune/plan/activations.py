"""Activations: what autograd keeps for the backward pass, counted on the meta device, and the
transient phases (the loss, one block's backward) sized from shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bytetune.kernels.fused_linear_ce import default_chunk_tokens
from bytetune.kernels.int8_head import REFERENCE_CHUNK_ROWS
from bytetune.kernels.llm_int8 import REFERENCE_GRAD_CHUNK_ELEMENTS
from bytetune.plan.meta_model import block_list, build_meta_model, target_linears
from bytetune.plan.spec import PlanSpec, as_dtype, dtype_bytes


@dataclass
class LossPhase:
    """The loss at the end of the forward and the start of the backward, beyond the after-blocks
    activations: what stays from its forward to its backward (``saved``) and the largest transient
    of its forward / backward. The forward transient depends on where the kernels run: CUDA takes
    the Triton kernels (in-place CE rows, weight-only int8 GEMM tile by tile), the CPU their
    PyTorch references (float32 copies, dequantized row slabs)."""

    fused: bool
    saved: int
    forward_cuda: int
    forward_cpu: int
    backward: int

    def peak(self, kind: str) -> int:
        forward = self.forward_cuda if kind == "cuda" else self.forward_cpu
        return self.saved + max(forward, self.backward)


@dataclass
class ActivationTrace:
    per_block: int  # saved by one block when it is not checkpointed
    block_input: int  # one block's input hidden states (what a checkpointed block keeps)
    shared: int  # saved once, used by every block (attention mask, ALiBi / rotary tables)
    before_blocks: int  # embeddings side
    after_blocks: int  # final norm and head (and the plain loss's saved log-softmax)
    loss: LossPhase  # the loss phase on the head's device
    block_backward_scratch: int  # the largest gradient buffers of one block's backward


class _TracedExperts(nn.Module):
    """Stands in for a fused experts module in the meta trace: transformers' expert loops read
    the routing (``nonzero``), which meta tensors cannot. Every (token, routed expert) pair runs
    the SwiGLU expert MLP once with expert 0's weights: the tensors autograd keeps have the
    shapes the real routing's have (rows = tokens x top-k). LoRA on expert parameters is a
    rank-r term per product, traced as such."""

    def __init__(self, experts: nn.Module, lora_r: int, lora_targets, lora_dtype):
        super().__init__()
        self.experts = experts
        e, n, k = experts.gate_up_proj.shape
        self.lora = nn.ModuleDict()
        for name, (out_f, in_f) in {"gate_up_proj": (n, k), "down_proj": (k, n // 2)}.items():
            if name in lora_targets:
                self.lora[name] = nn.Sequential(
                    nn.Linear(in_f, lora_r * e, bias=False, device="meta", dtype=lora_dtype),
                    nn.Linear(lora_r * e, out_f, bias=False, device="meta", dtype=lora_dtype),
                )

    def _product(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, getattr(self.experts, name)[0])
        if name in self.lora:
            y = y + self.lora[name](x.to(self.lora[name][0].weight.dtype)).to(y.dtype)
        return y

    def forward(self, hidden_states, top_k_index, top_k_weights):
        top_k = top_k_index.shape[-1]
        x = hidden_states.repeat_interleave(top_k, dim=0)
        gate, up = self._product("gate_up_proj", x).chunk(2, dim=-1)
        y = self._product("down_proj", self.experts.act_fn(gate) * up)
        y = y.view(-1, top_k, y.shape[-1]) * top_k_weights.to(y.dtype)[..., None]
        return y.sum(dim=1)


def _replace_experts_for_trace(model: nn.Module, spec: PlanSpec) -> None:
    from bytetune.quant_layers.int8_experts import is_fused_experts

    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for name in names:
        experts = model.get_submodule(name)
        model.set_submodule(
            name, _TracedExperts(experts, spec.lora_r, tuple(spec.lora_target_parameters), as_dtype(spec.lora_dtype))
        )


def _attach_lora(model: nn.Module, spec: PlanSpec) -> nn.Module:
    # peft is imported here, not with the module: `import bytetune` loads the planner, and peft's
    # import (torchao and its kernels) takes seconds that only a trace needs.
    from peft import LoraConfig, get_peft_model

    blocks = block_list(model)
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in target_linears(blocks[0][1], spec.lora_targets)})
    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, target_modules=names)
    model = get_peft_model(model, config)
    # Adapters in their training dtype (fp32: PEFT upcasts them): a 16-bit base then feeds them
    # fp32 copies of its activations, which autograd keeps. Meta tensors cannot run autocast; a
    # 16-bit run under autocast keeps less (measured on CPU: ~15 % fewer block activations), so
    # the count errs high there.
    lora_dtype = as_dtype(spec.lora_dtype)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(lora_dtype)
    return model


# The trace's attention, under a name of its own in transformers' attention interface: SDPA itself,
# with the mask that an all-ones attention mask gets (bytetune packs its batches: no token is
# padding). The stock SDPA mask builder reads the mask's values to decide whether SDPA may run with
# is_causal instead of a materialized mask, which meta tensors cannot answer; this builder decides
# as for a mask without padding, then builds what the stock one would. Both registrations are
# transformers' documented extension points (docs: attention_interface).
META_TRACE_ATTENTION = "bytetune_meta_trace_sdpa"


def _sdpa_mask_without_padding(*, attention_mask=None, allow_is_causal_skip: bool = True, **kwargs):
    from transformers.masking_utils import sdpa_mask

    if allow_is_causal_skip and sdpa_mask(attention_mask=None, allow_is_causal_skip=True, **kwargs) is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)


def _use_meta_trace_attention(model: nn.Module) -> None:
    """Switch a meta model built for SDPA to META_TRACE_ATTENTION. Models that run attention in
    their own code (BLOOM, Falcon) keep theirs: their mask builders (eager masks, or a mask they
    materialize on purpose) do not read the mask's values."""
    # Imported here, as peft is: transformers' modeling code loads with the first model built,
    # not with `import bytetune`.
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if model.config._attn_implementation != "sdpa" or not type(model).is_backend_compatible():
        return
    if META_TRACE_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(META_TRACE_ATTENTION, ALL_ATTENTION_FUNCTIONS["sdpa"])
        AttentionMaskInterface.register(META_TRACE_ATTENTION, _sdpa_mask_without_padding)
    model.set_attn_implementation(META_TRACE_ATTENTION)


def _trace_model(spec: PlanSpec) -> nn.Module:
    """A two-block copy of the model on the meta device, frozen, with LoRA attached as the trainer
    attaches it, in training mode."""
    model = build_meta_model(spec.model_config, spec.compute_dtype, num_layers=2)
    _use_meta_trace_attention(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model = _attach_lora(model, spec)
    _replace_experts_for_trace(model, spec)
    model.train()
    # Gradients reach the first block's LoRA through the embeddings output, as the trainer arranges
    # (enable_input_require_grads) so that checkpointed blocks see an input that requires grad.
    model.enable_input_require_grads()
    return model


class _SavedTensorCounter:
    """Which region of the forward (before the blocks, block 0, block 1, after them) saved each
    storage autograd keeps for the backward, and its size. Parameters and buffers are not counted."""

    REGIONS = ("before", "block0", "block1", "after")

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]]):
        self.param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
        self.param_storages |= {b.untyped_storage()._cdata for b in model.buffers()}
        self.region = "before"
        self.owners: dict[int, set[str]] = {}
        self.sizes: dict[int, int] = {}
        self.block_input_bytes: list[int] = []
        for index, (_, block) in enumerate(blocks):
            block.register_forward_pre_hook(lambda *_, i=index: self._enter(f"block{i}"))
            block.register_forward_hook(lambda *_: self._enter("after"))
        blocks[1][1].register_forward_pre_hook(self._record_block_input, with_kwargs=True)

    def _enter(self, region: str) -> None:
        self.region = region

    def _record_block_input(self, module, args, kwargs) -> None:
        self.block_input_bytes.append(_first_tensor(args, kwargs).untyped_storage().nbytes())

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.param_storages:
            self.owners.setdefault(key, set()).add(self.region)
            self.sizes[key] = storage.nbytes()
        return tensor

    def totals(self) -> dict[str, int]:
        """Bytes saved per block, shared by all blocks, before and after them. Blocks are identical:
        a storage saved by both is shared by all (mask, ALiBi); one saved only by the second block
        is that block's own (the first block's copy is the same size and not needed)."""
        counts = {"per_block": 0, "shared": 0, "before": 0, "after": 0}
        for key, regions in self.owners.items():
            in_blocks = regions & {"block0", "block1"}
            if len(in_blocks) == 2:
                counts["shared"] += self.sizes[key]
            elif in_blocks == {"block1"}:
                counts["per_block"] += self.sizes[key]
            elif in_blocks:
                continue
            elif "before" in regions:
                counts["before"] += self.sizes[key]
            else:
                counts["after"] += self.sizes[key]
        return counts


def _uses_fused_loss(spec: PlanSpec, head: nn.Module) -> bool:
    # The trainer's fused loss takes a bias-free head (float or Int8Head) of a model that FSDP2
    # does not shard (bytetune.trainer.loss.head_of); otherwise it falls back to the full logits.
    return spec.fused_cross_entropy and getattr(head, "bias", None) is None and spec.parallel != "fsdp"


def _run_traced_forward(model: nn.Module, spec: PlanSpec, fused: bool, counter: _SavedTensorCounter) -> None:
    """The trainer's forward on meta input ids, every saved tensor reported to ``counter``."""
    ids = torch.zeros(spec.micro_batch, spec.seq_len, dtype=torch.long, device="meta")
    # Fused: the trainer's call (last position's logits only, the hidden states returned); the
    # chunked loss itself is a custom kernel sized from shapes. Plain: HF's loss on the full logits,
    # traced. The trainer passes an attention mask; that also keeps the mask builders off a
    # data-dependent check (packed-sequence detection) that cannot run on meta tensors.
    loss_kwargs = dict(logits_to_keep=1, output_hidden_states=True) if fused else dict(labels=ids)
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **loss_kwargs)
    except RuntimeError as error:
        inner = model.get_base_model()
        raise NotImplementedError(
            f"cannot trace {type(inner).__name__} on the meta device: {str(error).splitlines()[0]}"
        ) from None


def block_backward_scratch(spec: PlanSpec, hidden: int) -> int:
    """One block's backward: the attention-score gradients (two fp32 buffers around the softmax
    and one in the model's dtype) or three of the MLP's widest gradients, whichever is larger,
    plus the hidden-state gradients in flight. The buffer counts are what CPU runs of BLOOM shapes
    needed (tests/plan/test_plan_measured.py); autograd does not report them."""
    cfg = spec.model_config
    batch, seq = spec.micro_batch, spec.seq_len
    compute = dtype_bytes(spec.compute_dtype)
    tokens = batch * seq
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    ffn = getattr(cfg, "intermediate_size", None) or 4 * hidden
    attention_scratch = batch * heads * seq * seq * (4 + 4 + compute)
    mlp_scratch = 3 * tokens * ffn * compute
    return max(attention_scratch, mlp_scratch) + 2 * tokens * hidden * compute


def trace_activations(spec: PlanSpec) -> ActivationTrace:
    """Run a two-block copy of the model forward on the meta device and count what autograd keeps."""
    model = _trace_model(spec)
    inner = model.get_base_model()
    head = inner.get_output_embeddings()
    fused = _uses_fused_loss(spec, head)
    counter = _SavedTensorCounter(model, block_list(inner))
    _run_traced_forward(model, spec, fused, counter)
    totals = counter.totals()

    vocab, hidden = head.out_features, head.in_features
    batch, seq = spec.micro_batch, spec.seq_len
    compute = dtype_bytes(spec.compute_dtype)
    int8_head = spec.embeddings == "int8"
    loss = fused_loss_phase(batch, seq, hidden, vocab, compute, int8_head) if fused else \
        plain_loss_phase(batch * seq, hidden, vocab, compute, int8_head)
    return ActivationTrace(
        per_block=totals["per_block"],
        block_input=counter.block_input_bytes[0],
        shared=totals["shared"],
        before_blocks=totals["before"],
        after_blocks=totals["after"],
        loss=loss,
        block_backward_scratch=block_backward_scratch(spec, hidden),
    )


def int8_head_reference_scratch(rows: int, hidden: int) -> tuple[int, int]:
    """(forward, backward) temporaries of the int8 head's PyTorch reference GEMMs for ``rows``
    token rows (CPU): the float32 input and product, one dequantized float32 slab of weight rows
    (REFERENCE_CHUNK_ROWS forward; REFERENCE_GRAD_CHUNK_ELEMENTS // hidden rows for the input
    gradient), and the float32 gradient it accumulates."""
    fwd_rows, bwd_rows = REFERENCE_CHUNK_ROWS, max(1, REFERENCE_GRAD_CHUNK_ELEMENTS // hidden)
    forward = rows * hidden * 4 + 2 * rows * fwd_rows * 4 + fwd_rows * hidden * 4
    backward = 2 * rows * hidden * 4 + 2 * bwd_rows * hidden * 4 + rows * bwd_rows * 4
    return forward, backward


def plain_loss_phase(tokens: int, hidden: int, vocab: int, compute: int, int8_head: bool) -> LossPhase:
    """HF's loss on the full ``[tokens, vocab]`` logits: the logits (and their float32 copy for a
    16-bit model); in the backward the log-softmax gradient and its input's gradient in float32 at
    once (and the cast back to the model's dtype). The saved log-softmax is in the trace."""
    logits = tokens * vocab * compute
    forward = logits + (tokens * vocab * 4 if compute != 4 else 0)
    backward = 2 * tokens * vocab * 4 + (logits if compute != 4 else 0)
    forward_cpu = forward
    if int8_head:
        # Triton's weight-only GEMM needs nothing beyond its output; the reference's row slabs
        # come on top of the logits (forward) or of their gradient (backward).
        ref_fwd, ref_bwd = int8_head_reference_scratch(tokens, hidden)
        forward_cpu = max(forward, logits + ref_fwd, logits + ref_bwd)
    return LossPhase(fused=False, saved=0, forward_cuda=forward, forward_cpu=forward_cpu, backward=backward)


# The fused loss's gradient w.r.t. the last hidden states is float32: under autocast the final
# norm runs in float32 (and an fp32 model is float32 anyway).
FUSED_HIDDEN_BYTES = 4


def fused_loss_phase(batch: int, seq: int, hidden: int, vocab: int, compute: int, int8_head: bool) -> LossPhase:
    """bytetune.kernels.fused_linear_ce over the ``batch * (seq - 1)`` target tokens (bytetune's
    packed blocks ignore none), in chunks of ``default_chunk_tokens`` (larger on a CPU).

    Saved from its forward to its backward: the gradient w.r.t. the hidden states (tokens x
    hidden). Forward, per chunk: the hidden rows cast to the compute dtype (when it differs), the
    chunk's logits (C x vocab, overwritten in place by their gradient), the chunk's input gradient
    (C x hidden) before it is copied into place; for batch > 1 the shifted hidden states are a
    copy. The CPU reference CE adds float32 buffers of the chunk's logits; the int8 head's CPU
    reference GEMMs their row slabs. Backward: the scaled gradient and the gradient of the shifted
    view (batch x seq x hidden) beside the saved one.
    """
    n = batch * (seq - 1)
    if n < 1:
        return LossPhase(fused=True, saved=0, forward_cuda=0, forward_cpu=0, backward=0)
    hid = FUSED_HIDDEN_BYTES

    def chunk_bytes(chunk: int) -> tuple[int, int, int]:
        """(shared part, chunk logits, chunk input gradient) of a chunk of that many tokens."""
        base = (n * hidden * hid if batch > 1 else 0) + (chunk * hidden * compute if hid != compute else 0)
        return base, chunk * vocab * compute, chunk * hidden * compute

    base, chunk_logits, grad_rows = chunk_bytes(default_chunk_tokens(n, hidden, vocab))
    forward_cuda = base + chunk_logits + grad_rows
    chunk = default_chunk_tokens(n, hidden, vocab, on_cpu=True)  # larger chunks on a CPU
    base, chunk_logits, grad_rows = chunk_bytes(chunk)
    ce_reference = chunk * vocab * 4 + (chunk * vocab * 4 if compute < 4 else 0)
    gemm_reference = max(int8_head_reference_scratch(chunk, hidden)) if int8_head else 0
    forward_cpu = base + chunk_logits + max(ce_reference, grad_rows + gemm_reference)
    backward = n * hidden * hid + batch * seq * hidden * hid
    return LossPhase(fused=True, saved=n * hidden * hid, forward_cuda=forward_cuda, forward_cpu=forward_cpu,
                     backward=backward)


def _first_tensor(args, kwargs) -> torch.Tensor:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("block called without a tensor input")
