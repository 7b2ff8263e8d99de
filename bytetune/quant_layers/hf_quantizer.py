"""Quantize while loading: a transformers quantization method for Int8Linear.

``AutoModelForCausalLM.from_pretrained(path, quantization_config=Int8Config(...))`` builds the
model on the meta device, swaps its linear layers for Int8Linear (meta tensors), then the loader
reads the checkpoint one tensor at a time: every weight of an Int8Linear goes through
:class:`Int8Quantize`, which turns it into the int8 weight and its scale before the next tensor is
read. The full 16-bit model is never in memory.

A saved quantized model carries ``quantization_config`` in its config.json; loading it back
builds the same Int8Linear layers and reads the int8 weights and scales as they are.

Registration with transformers is per process; importing this module (``import bytetune`` does)
is what registers the method.
"""

from __future__ import annotations

import torch
from torch import nn

from bytetune.quant_layers.convert import dequantize_model, is_quantizable, mark_kbit_loaded
from transformers.quantizers.quantizers_utils import get_module_from_name

from bytetune.quant_layers.hf_quantizer_base import (
    FrozenLinearHfQuantizer,
    QuantizeOnLoad,
    register_method,
    swap_linear_layers,
)
from bytetune.quant_layers.int8_config import QUANT_METHOD, Int8Config
from bytetune.quant_layers.int8_experts import EXPERT_PARAMETERS, Int8Experts, is_fused_experts, router_names
from bytetune.quant_layers.int8_linear import Int8Linear, is_conv1d

class Int8Quantize(QuantizeOnLoad):
    """Checkpoint weight (16/32-bit) -> {weight: int8 [out, in], weight_scale: float32 [out]}."""

    def quantize(self, module: nn.Module, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the layer's own rule (an Int8Experts' fused [E, N, K] weight, a Conv1D's [in, out] one)
        return module.quantize_checkpoint_weight(value)


    @torch.no_grad()
    def convert(self, input_dict: dict, model: nn.Module | None = None, full_layer_name: str | None = None, **kwargs):
        module, tensor_name = get_module_from_name(model, full_layer_name)
        if not isinstance(module, Int8Experts):
            return super().convert(input_dict, model=model, full_layer_name=full_layer_name, **kwargs)
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        codes, scales = self.quantize(module, value)
        prefix = full_layer_name.rpartition(".")[0]
        return {full_layer_name: codes, f"{prefix}.{tensor_name}_scale": scales}


class Int8HfQuantizer(FrozenLinearHfQuantizer):
    quantization_config: Int8Config
    layer_class = Int8Linear
    quantize_op = Int8Quantize
    mark_loaded = staticmethod(mark_kbit_loaded)
    dequantize_layers = staticmethod(dequantize_model)

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        # Called with the user's device_map before the layers are swapped, and again with the
        # resolved map when device_map is "auto"/"balanced"/...: the second call is the first time
        # the disk placement of an "auto" map is known.
        if isinstance(device_map, dict) and not self.pre_quantized:
            self.disk_modules = [name for name, device in device_map.items() if device == "disk"]
            model = getattr(self, "swapped_model", None)
            if model is not None:
                restore_float_layers(model, self.replaced_layers, self.disk_modules)

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        if isinstance(module, Int8Experts):
            return tensor_name in EXPERT_PARAMETERS
        return super().param_needs_quantization(model, param_name, **kwargs)

    def _swap_layers(self, model: nn.Module) -> None:
        # When quantizing on the fly, disk-offloaded layers stay in the checkpoint's dtype:
        # transformers' offload index points at the original checkpoint tensor for weights
        # converted while loading, so an int8 layer would read float bytes back as int8
        # (bitsandbytes keeps offloaded layers in float too). An int8 checkpoint offloads as is.
        self.modules_to_not_convert += getattr(self, "disk_modules", [])
        self.modules_to_not_convert += sorted(router_names(model))  # MoE routers stay float
        self.replaced_layers = replace_with_int8_linear(
            model, self.modules_to_not_convert, self.quantization_config.threshold
        )
        self.replaced_layers.update(
            replace_with_int8_experts(model, self.modules_to_not_convert, self.quantization_config.threshold)
        )
        self.swapped_model = model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        self.swapped_model = self.replaced_layers = None  # drop the meta float layers
        return super()._process_model_after_weight_loading(model, **kwargs)


def replace_with_int8_linear(
    model: nn.Module, modules_to_not_convert: list[str], threshold: float
) -> dict[str, nn.Module]:
    """Swap linear layers for empty Int8Linear ones on the meta device (before weights load).

    Returns the replaced (meta) float layers by name, so that a later device map can put some back.
    """

    def build(name: str, float_layer: nn.Module) -> Int8Linear:
        conv1d = is_conv1d(float_layer)
        out_features, in_features = (
            (float_layer.nf, float_layer.nx) if conv1d else (float_layer.out_features, float_layer.in_features)
        )
        bias = float_layer.bias
        int8_layer = Int8Linear(
            in_features,
            out_features,
            bias=bias is not None,
            threshold=threshold,
            bias_dtype=None if bias is None else bias.dtype,
        )
        int8_layer.source_is_conv1d = conv1d
        # transformers runs its float initializers (normal_) on weights it did not see loaded, such
        # as those offloaded to disk; int8 storage cannot take them, and its values come from the
        # checkpoint anyway.
        int8_layer.weight._is_hf_initialized = True
        return int8_layer

    return swap_linear_layers(model, modules_to_not_convert, is_quantizable, build)


def replace_with_int8_experts(
    model: nn.Module, modules_to_not_convert: list[str], threshold: float
) -> dict[str, nn.Module]:
    """Swap fused MoE experts modules for empty Int8Experts on the meta device; each checkpoint
    expert weight is then quantized as it is read (Int8Quantize)."""

    def build(name: str, float_experts: nn.Module) -> Int8Experts:
        e, two_i, h = float_experts.gate_up_proj.shape
        layer = Int8Experts(e, h, two_i // 2, float_experts.act_fn, threshold=threshold)
        layer.source = (type(float_experts), getattr(float_experts, "config", None))
        for pname in EXPERT_PARAMETERS:
            getattr(layer, pname)._is_hf_initialized = True  # int8 storage takes no float init
        return layer

    return swap_linear_layers(model, modules_to_not_convert, is_fused_experts, build)


def restore_float_layers(model: nn.Module, replaced: dict[str, nn.Module], prefixes: list[str]) -> None:
    """Put back the float layers whose name lies under one of ``prefixes`` ("" is the root)."""
    for name, float_layer in replaced.items():
        if any(p == "" or name == p or name.startswith(p + ".") for p in prefixes):
            model.set_submodule(name, float_layer)


def register() -> None:
    """Register the method with transformers (idempotent; transformers refuses duplicates)."""
    register_method(QUANT_METHOD, Int8Config, Int8HfQuantizer)


register()
