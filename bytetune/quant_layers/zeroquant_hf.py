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
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from bytetune.kernels.groupwise import DEFAULT_GROUP_SIZE, quantize_groupwise
from bytetune.quant_layers.group_linear import GroupQuantLinear
from bytetune.quant_layers.zeroquant import (
    DEFAULT_BITS,
    DEFAULT_MODULE_BITS,
    bits_for,
    dequantize_zeroquant_model,
    is_float_linear,
    mark_zeroquant_loaded,
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


class GroupQuantize(ConversionOps):
    """Checkpoint weight (16/32-bit) -> {weight: codes, weight_scale: float32 group scales}."""

    def __init__(self, hf_quantizer: HfQuantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict, model: nn.Module | None = None, full_layer_name: str | None = None, **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        module, _ = get_module_from_name(model, full_layer_name)
        codes, scales = quantize_groupwise(value.float().contiguous(), module.bits, module.group_size)
        prefix = full_layer_name.rpartition(".")[0]
        return {full_layer_name: codes, f"{prefix}.weight_scale": scales}


class ZeroQuantHfQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: ZeroQuantConfig

    @property
    def quantized_element_size(self) -> float:
        # The loader sizes its memory plan with this: INT4 layers need half of it.
        return 1

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, GroupQuantLinear) and tensor_name == "weight"

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.skip_modules, model._keep_in_fp32_modules, add_default_skips=True
        )
        replace_with_group_quant_linear(model, self.modules_to_not_convert, self.quantization_config)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        mark_zeroquant_loaded(model)
        return model

    def get_quantize_ops(self) -> ConversionOps:
        return GroupQuantize(self)

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_zeroquant_model(model, dtype=dtype or torch.float32)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Adapters on top (LoRA) train; the quantized weights stay frozen.
        return True


def replace_with_group_quant_linear(model: nn.Module, modules_to_not_convert: list[str], config: ZeroQuantConfig) -> int:
    """Swap linear layers for empty GroupQuantLinear ones on the meta device (before weights load)."""
    names = [
        name
        for name, module in model.named_modules()
        if name and is_float_linear(module) and should_convert_module(name, modules_to_not_convert)
    ]
    for name in names:
        float_layer = model.get_submodule(name)
        with torch.device("meta"):
            layer = GroupQuantLinear(
                float_layer.in_features,
                float_layer.out_features,
                bias=float_layer.bias is not None,
                bits=bits_for(name, config.module_bits, config.default_bits),
                group_size=config.group_size,
                act_bits=config.act_bits,
                bias_dtype=None if float_layer.bias is None else float_layer.bias.dtype,
            )
        model.set_submodule(name, layer)
    return len(names)


def register() -> None:
    """Register the method with transformers (idempotent; transformers refuses duplicates)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ZeroQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ZeroQuantHfQuantizer)


register()
