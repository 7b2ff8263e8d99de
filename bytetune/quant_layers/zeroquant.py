"""ZeroQuant for whole models: which linear layers get INT8 or INT4, and the swap itself.

The default is ZeroQuant's W4/8-A8 (arXiv 2206.01861): attention projections INT8, MLP weights
INT4, activations INT8 per token, groups of 128 along the input dimension. Modules are picked by
regex patterns on their names; the output head and weights tied to an embedding stay float.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from bytetune.kernels.groupwise import DEFAULT_GROUP_SIZE
from bytetune.quant_layers.convert import QuantizationReport, default_skip_names, mark_kbit_loaded, model_bytes
from bytetune.quant_layers.file_backed import copy_out_of_file_mappings
from bytetune.quant_layers.group_linear import GroupQuantLinear
from bytetune.quant_layers.int8_linear import Int8Linear

# Attention blocks of Llama/Mistral/Qwen (self_attn), Bloom (self_attention), GPT-2/OPT (attn /
# attention); MLP blocks (mlp, feed_forward, ffn). First match wins.
DEFAULT_MODULE_BITS: dict[str, int] = {
    r"(^|\.)(self_attn|self_attention|attn|attention)\.": 8,
    r"(^|\.)(mlp|feed_forward|ffn)\.": 4,
}
DEFAULT_BITS = 8  # for a linear layer no pattern names


def bits_for(name: str, module_bits: dict[str, int], default_bits: int = DEFAULT_BITS) -> int:
    """The weight bits of module ``name``: the first pattern (``re.search``) that matches, else
    ``default_bits``."""
    for pattern, bits in module_bits.items():
        if re.search(pattern, name):
            return bits
    return default_bits


def is_float_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, (GroupQuantLinear, Int8Linear))


def zeroquant_targets(
    model: nn.Module, skip: Iterable[str] = (), default_skips: bool = True
) -> list[str]:
    """Names of the float nn.Linear layers to quantize: all but the head, tied layers and ``skip``
    (matched as transformers matches ``modules_to_not_convert``)."""
    skipped = default_skip_names(model) if default_skips else set()
    skip = list(skip)
    return [
        name
        for name, module in model.named_modules()
        if name and is_float_linear(module) and name not in skipped and should_convert_module(name, skip)
    ]


@torch.no_grad()
def quantize_model_zeroquant(
    model: nn.Module,
    module_bits: dict[str, int] | None = None,
    default_bits: int = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    act_bits: int = 8,
    skip: Iterable[str] = (),
) -> QuantizationReport:
    """Replace, in place, the model's float linear layers by GroupQuantLinear.

    ``module_bits`` maps name patterns to 8 or 4 (default: attention INT8, MLP INT4; other linear
    layers ``default_bits``). One layer's float weight is freed as soon as it is quantized.
    """
    module_bits = DEFAULT_MODULE_BITS if module_bits is None else module_bits
    bytes_before = model_bytes(model)
    targets = zeroquant_targets(model, skip)
    quantized_params = 0
    for name in targets:
        float_layer = model.get_submodule(name)
        layer = GroupQuantLinear.from_linear(
            float_layer, bits=bits_for(name, module_bits, default_bits), group_size=group_size, act_bits=act_bits
        )
        model.set_submodule(name, layer)
        quantized_params += layer.in_features * layer.out_features
    if targets:
        copy_out_of_file_mappings(model)  # lets the float checkpoint's mapping go
        mark_kbit_loaded(model)
    return QuantizationReport(
        bytes_before=bytes_before,
        bytes_after=model_bytes(model),
        n_quantized=len(targets),
        quantized_params=quantized_params,
    )


def quantized_weight_bytes_per_param(model: nn.Module) -> dict[str, float]:
    """Bytes per weight of the quantized linear layers (codes + scales), and of the whole model
    (every parameter and buffer, tied tensors once) per model parameter of the float original."""
    code_bytes = scale_bytes = weights = 0
    for module in model.modules():
        if isinstance(module, GroupQuantLinear):
            code_bytes += module.weight.numel() * module.weight.element_size()
            scale_bytes += module.weight_scale.numel() * module.weight_scale.element_size()
            weights += module.in_features * module.out_features
    float_params = 0
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if isinstance(owner, GroupQuantLinear) and name.endswith(("weight", "weight_scale")):
            continue
        float_params += tensor.numel()
    total_params = weights + float_params
    return {
        "quantized_linear": (code_bytes + scale_bytes) / max(weights, 1),
        "whole_model": model_bytes(model) / max(total_params, 1),
        "quantized_fraction": weights / max(total_params, 1),
    }
