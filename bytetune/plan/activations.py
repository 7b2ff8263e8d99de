"""Activations: what autograd keeps for the backward pass, counted on the meta device, and the
transient phases (the loss, one block's backward) sized from shapes."""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn
from transformers import masking_utils

from bytetune.plan.meta_model import block_list, build_meta_model, target_linears
from bytetune.plan.spec import PlanSpec, as_dtype, dtype_bytes


@dataclass
class ActivationTrace:
    per_block: int  # saved by one block when it is not checkpointed
    block_input: int  # one block's input hidden states (what a checkpointed block keeps)
    shared: int  # saved once, used by every block (attention mask, ALiBi / rotary tables)
    before_blocks: int  # embeddings side
    after_blocks: int  # final norm, head and loss
    logits: int  # the head's output: alive while the loss is computed (16-bit models add an fp32 copy)
    loss_backward_scratch: int  # gradient buffers of the loss backward (fp32 log-softmax grads)
    block_backward_scratch: int  # the largest gradient buffers of one block's backward


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


def trace_activations(spec: PlanSpec) -> ActivationTrace:
    """Run a two-block copy of the model forward on the meta device and count what autograd keeps."""
    model = build_meta_model(spec.model_config, spec.compute_dtype, num_layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    model = _attach_lora(model, spec)
    model.train()
    # Gradients reach the first block's LoRA through the embeddings output, as the trainer arranges
    # (enable_input_require_grads) so that checkpointed blocks see an input that requires grad.
    model.enable_input_require_grads()
    inner = model.get_base_model()
    blocks = block_list(inner)

    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    param_storages |= {b.untyped_storage()._cdata for b in model.buffers()}
    region = ["before"]
    owners: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in param_storages:
            owners.setdefault(key, set()).add(region[0])
            sizes[key] = storage.nbytes()
        return tensor

    for index, (_, block) in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, i=index: region.__setitem__(0, f"block{i}"))
        block.register_forward_hook(lambda *_: region.__setitem__(0, "after"))

    batch, seq = spec.micro_batch, spec.seq_len
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    block_inputs: list[int] = []
    blocks[1][1].register_forward_pre_hook(
        lambda mod, args, kwargs: block_inputs.append(_first_tensor(args, kwargs).untyped_storage().nbytes()),
        with_kwargs=True,
    )
    # The trainer passes an attention mask; that also keeps the mask builders off a data-dependent
    # check (packed-sequence detection) that cannot run on meta tensors. Its packed batches have no
    # padding, which is what the SDPA mask builder would find if it could read the mask.
    try:
        with mock.patch.object(masking_utils, "fast_all", lambda tensor: True), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
    except RuntimeError as error:
        raise NotImplementedError(
            f"cannot trace {type(inner).__name__} on the meta device: {str(error).splitlines()[0]}"
        ) from None

    # Blocks are identical: a storage saved by both is shared by all (mask, ALiBi); one saved only by
    # the second block is that block's own (the first block's copy is the same size and not needed).
    counts = {"per_block": 0, "shared": 0, "before": 0, "after": 0}
    for key, regs in owners.items():
        in_blocks = regs & {"block0", "block1"}
        if len(in_blocks) == 2:
            counts["shared"] += sizes[key]
        elif in_blocks == {"block1"}:
            counts["per_block"] += sizes[key]
        elif in_blocks:
            continue
        elif "before" in regs:
            counts["before"] += sizes[key]
        else:
            counts["after"] += sizes[key]
    per_block, shared, before, after = counts["per_block"], counts["shared"], counts["before"], counts["after"]

    cfg = spec.model_config
    vocab = inner.get_output_embeddings().out_features
    compute = dtype_bytes(spec.compute_dtype)
    tokens = batch * seq
    logits = tokens * vocab * (compute + (4 if compute != 4 else 0))
    # Cross-entropy backward holds the log-softmax output's gradient and its input's gradient (fp32)
    # at once; a non-fp32 model adds the cast back to its dtype.
    loss_scratch = 2 * tokens * vocab * 4 + (tokens * vocab * compute if compute != 4 else 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    hidden = cfg.hidden_size
    ffn = getattr(cfg, "intermediate_size", None) or 4 * hidden
    # One block's backward: the attention-score gradients (two fp32 buffers around the softmax and
    # one in the model's dtype) or three of the MLP's widest gradients, whichever is larger, plus the
    # hidden-state gradients in flight. The buffer counts are what CPU runs of BLOOM shapes needed
    # (tests/plan/test_plan_measured.py); autograd does not report them.
    attention_scratch = batch * heads * seq * seq * (4 + 4 + compute)
    mlp_scratch = 3 * tokens * ffn * compute
    block_scratch = max(attention_scratch, mlp_scratch) + 2 * tokens * hidden * compute
    return ActivationTrace(
        per_block=per_block,
        block_input=block_inputs[0],
        shared=shared,
        before_blocks=before,
        after_blocks=after,
        logits=logits,
        loss_backward_scratch=loss_scratch,
        block_backward_scratch=block_scratch,
    )


def _first_tensor(args, kwargs) -> torch.Tensor:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("block called without a tensor input")
