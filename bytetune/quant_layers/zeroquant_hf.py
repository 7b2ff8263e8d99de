"""Quantize while loading: a transformers quantization method for GroupQuantLinear (ZeroQuant).

``AutoModelForCausalLM.from_pretrained(path, quantization_config=ZeroQuantConfig())`` builds the
model on the meta device, swaps the selected linear layers for GroupQuantLinear shells, and turns
each checkpoint weight into codes + group scales as it is read (the 16-bit model never exists in
memory). A saved model carries ``quantization_config`` and loads back as it was saved.
Registration is per process; importing bytetune registers ``bytetune_zeroquant``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from bytetune.kernels.groupwise import DEFAULT_GROUP_SIZE
from bytetune.quant_layers.convert import dequantize_model, mark_kbit_loaded
from bytetune.quant_layers.group_linear import GroupQuantLinear
from bytetune.quant_layers.hf_quantizer_base import (
    FrozenLinearHfQuantizer,
    QuantizeOnLoad,
    register_method,
    swap_linear_layers,
)
from bytetune.quant_layers.zeroquant import (
    DEFAULT_BITS,
    DEFAULT_MODULE_BITS,
    bits_for,
    is_float_linear,
)

QUANT_METHOD = "bytetune_zeroquant"


class ZeroQuantConfig(QuantizationConfigMixin):
    """ZeroQuant group-wise quantization of linear layers while loading.

    Default W4/8-A8: attention projections INT8, MLP weights INT4, INT8 token-wise activations,
    groups of 128 input columns.

    Args:
        module_bits: {regex on the module name: 8 or 4}; the first pattern that ``re.search``es
            the name wins (default: attention blocks 8, MLP blocks 4).
        default_bits: bits of a linear layer no pattern matches.
        group_size: input columns per scale (a multiple of 32; a ragged last group is fine).
        act_bits: 8 (INT8 activations per token) or 16 (float activations).
        skip_modules: names kept in their original precision (prefixes, suffixes or regexes, as
            transformers matches them), on top of the output head and tied embeddings.
    """

    def __init__(
        self,
        module_bits: dict[str, int] | None = None,
        default_bits: int = DEFAULT_BITS,
        group_size: int = DEFAULT_GROUP_SIZE,
        act_bits: int = 8,
        skip_modules: list[str] | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.module_bits = dict(DEFAULT_MODULE_BITS if module_bits is None else module_bits)
        self.default_bits = int(default_bits)
        self.group_size = int(group_size)
        self.act_bits = int(act_bits)
        self.skip_modules = list(skip_modules) if skip_modules is not None else None
        for pattern, bits in list(self.module_bits.items()) + [("default_bits", self.default_bits)]:
            if bits not in (8, 4):
                raise ValueError(f"bits must be 8 or 4, got {bits} for {pattern!r}")
        if self.act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        if self.group_size < 32 or self.group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32, got {group_size}")


class GroupQuantize(QuantizeOnLoad):
    """Checkpoint weight (16/32-bit) -> {weight: codes, weight_scale: float32 group scales}."""

    def quantize(self, module: nn.Module, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return module.quantize_checkpoint_weight(value)


class ZeroQuantHfQuantizer(FrozenLinearHfQuantizer):
    quantization_config: ZeroQuantConfig
    layer_class = GroupQuantLinear
    quantize_op = GroupQuantize
    mark_loaded = staticmethod(mark_kbit_loaded)
    dequantize_layers = staticmethod(dequantize_model)

    def _swap_layers(self, model: nn.Module) -> None:
        replace_with_group_quant_linear(model, self.modules_to_not_convert, self.quantization_config)


def replace_with_group_quant_linear(model: nn.Module, modules_to_not_convert: list[str], config: ZeroQuantConfig) -> int:
    """Swap linear layers for empty GroupQuantLinear ones on the meta device (before weights load)."""

    def build(name: str, float_layer: nn.Module) -> GroupQuantLinear:
        return GroupQuantLinear(
            float_layer.in_features,
            float_layer.out_features,
            bias=float_layer.bias is not None,
            bits=bits_for(name, config.module_bits, config.default_bits),
            group_size=config.group_size,
            act_bits=config.act_bits,
            bias_dtype=None if float_layer.bias is None else float_layer.bias.dtype,
        )

    return len(swap_linear_layers(model, modules_to_not_convert, is_float_linear, build))


def register() -> None:
    """Register the method with transformers (idempotent; transformers refuses duplicates)."""
    register_method(QUANT_METHOD, ZeroQuantConfig, ZeroQuantHfQuantizer)


register()
