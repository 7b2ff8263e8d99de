"""Static memory, counted exactly from the meta parameters: weights (quantized codes and scales
where quantized), LoRA parameters and gradients, optimizer states; per placement unit."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from bytetune.plan.meta_model import block_list, target_linears
from bytetune.plan.spec import PlanSpec, dtype_bytes
from bytetune.quant_layers.int8_experts import EXPERT_PARAMETERS, is_fused_experts
from bytetune.quant_layers.zeroquant import DEFAULT_MODULE_BITS, bits_for

# LLM.int8() layout (bytetune.Int8Linear): int8 weight [N, K] and a float32 scale per output row.
INT8_SCALE_BYTES = 4
# ZeroQuant layout (bytetune.GroupQuantLinear): INT8 [N, K] or INT4 two per byte [N, K / 2], plus a
# float32 scale per (row, group of group_size input columns).
GROUP_SCALE_BYTES = 4


def _quantized_weight_bytes(name: str, linear: nn.Linear, spec: PlanSpec) -> tuple[int, int]:
    """(codes, scales) bytes of one quantized linear."""
    n, k = linear.out_features, linear.in_features
    if spec.quantization == "int8":
        return n * k, n * INT8_SCALE_BYTES
    bits = bits_for(name, spec.zeroquant_bits or DEFAULT_MODULE_BITS)
    groups = math.ceil(k / spec.group_size)
    return n * (k * bits // 8), n * groups * GROUP_SCALE_BYTES


def optimizer_state_bytes(numel: int, spec: PlanSpec) -> int:
    """Optimizer state of one parameter tensor."""
    if spec.optimizer_bits == 32 or numel < spec.min_8bit_size:
        return spec.optimizer_states * 4 * numel  # fp32 moments
    blocks = math.ceil(numel / spec.optimizer_block)
    return spec.optimizer_states * (numel + 4 * blocks)  # uint8 codes + a float32 absmax per block


@dataclass
class ModuleCost:
    """Memory of one top-level placement unit (a block, the embeddings, the head ...)."""

    name: str
    quantized_weights: int = 0  # codes + scales
    quantized_scales: int = 0  # the scales alone: buffers, which FSDP2 does not shard
    other_weights: int = 0
    lora_params: int = 0  # bytes
    lora_grads: int = 0
    optimizer_states: int = 0
    lora_numel: int = 0

    @property
    def static(self) -> int:
        return self.quantized_weights + self.other_weights + self.lora_params + self.lora_grads + self.optimizer_states


def weight_costs(model: nn.Module, spec: PlanSpec) -> dict[str, ModuleCost]:
    """Per module holding parameters (a block counts as one): weights (quantized codes and scales
    where quantized), LoRA parameters, gradients and optimizer states."""
    blocks = block_list(model)
    block_names = {name for name, _ in blocks}
    compute = dtype_bytes(spec.compute_dtype)
    lora_bytes = dtype_bytes(spec.lora_dtype)

    def unit_of(param_name: str) -> str:
        for name in block_names:
            if param_name.startswith(name + "."):
                return name
        # Outside the blocks accelerate places the direct children of the model's submodules.
        return param_name.rsplit(".", 1)[0]

    quantized: dict[str, tuple[int, int]] = {}  # weight param name -> (codes, scales) bytes
    lora: dict[str, int] = {}
    # Fused MoE experts (Int8Experts when quantizing with int8): codes [E, N, K] + a float32 scale
    # per expert row; LoRA on a targeted expert parameter is PEFT's ParamWrapper layout,
    # A [E * r, K] and B [N, r * E].
    expert_lora: dict[str, tuple[int, int]] = {}  # param name -> (A numel, B numel)
    for bname, block in blocks:
        for mname, module in block.named_modules():
            if not is_fused_experts(module):
                continue
            for pname in EXPERT_PARAMETERS:
                e, n, k = getattr(module, pname).shape
                full = f"{bname}.{mname}.{pname}"
                if spec.quantization == "int8":
                    quantized[full] = e * n * k, e * n * INT8_SCALE_BYTES
                if pname in spec.lora_target_parameters:
                    expert_lora[full] = e * spec.lora_r * k, n * spec.lora_r * e
    for bname, block in blocks:
        for lname, linear in target_linears(block, spec.lora_targets):
            lora[f"{bname}.{lname}"] = spec.lora_r * (linear.out_features + linear.in_features)
        if spec.quantization == "none":
            continue
        for lname, linear in target_linears(block, "all-linear"):
            full = f"{bname}.{lname}"
            if not any(full == s or full.endswith("." + s) for s in spec.quantization_skip):
                quantized[f"{full}.weight"] = _quantized_weight_bytes(full, linear, spec)

    if spec.embeddings == "int8":
        # Int8Embedding / Int8Head: int8 [vocab, hidden] + a float32 scale per row; a tied head
        # holds the embedding's Parameter (skipped below as a duplicate) and reads its scales.
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is None:
                continue
            rows, cols = layer.weight.shape
            for pname, param in model.named_parameters(remove_duplicate=False):
                if param is layer.weight:
                    quantized[pname] = rows * cols, rows * INT8_SCALE_BYTES

    costs: dict[str, ModuleCost] = {}
    seen: set[int] = set()
    for pname, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights are stored once
            continue
        seen.add(id(param))
        unit = costs.setdefault(unit_of(pname), ModuleCost(unit_of(pname)))
        if pname in quantized:
            codes, scales = quantized[pname]
            unit.quantized_weights += codes + scales
            unit.quantized_scales += scales
        else:
            unit.other_weights += param.numel() * compute
    for lname, numel in lora.items():
        unit = costs[unit_of(lname + ".weight")]
        r = spec.lora_r
        unit.lora_numel += numel
        unit.lora_params += numel * lora_bytes
        unit.lora_grads += numel * lora_bytes
        # A is [r, K] and B is [N, r]: the 8-bit rule applies per tensor.
        linear = model.get_submodule(lname)
        unit.optimizer_states += optimizer_state_bytes(r * linear.in_features, spec)
        unit.optimizer_states += optimizer_state_bytes(r * linear.out_features, spec)
    for pname, (a_numel, b_numel) in expert_lora.items():
        unit = costs[unit_of(pname)]
        unit.lora_numel += a_numel + b_numel
        unit.lora_params += (a_numel + b_numel) * lora_bytes
        unit.lora_grads += (a_numel + b_numel) * lora_bytes
        unit.optimizer_states += optimizer_state_bytes(a_numel, spec) + optimizer_state_bytes(b_numel, spec)
    return costs
