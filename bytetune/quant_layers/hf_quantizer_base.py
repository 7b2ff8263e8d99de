"""What the two transformers quantization methods share: ``bytetune_int8`` (hf_quantizer.py,
Int8Linear) and ``bytetune_zeroquant`` (zeroquant_hf.py, GroupQuantLinear).

Both swap linear layers for empty frozen quantized ones on the meta device before the weights
load, quantize each checkpoint weight into ``weight`` codes + ``weight_scale`` as it is read, and
register themselves with transformers when imported. The subclasses say which layer, how a weight
is quantized and how the layers are swapped.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from bytetune.quant_layers.file_backed import copy_out_of_file_mappings


class QuantizeOnLoad(ConversionOps):
    """Checkpoint weight (16/32-bit) -> {weight: codes, weight_scale: float32 scales} of the layer
    it loads into; subclasses implement :meth:`quantize`."""

    def __init__(self, hf_quantizer: HfQuantizer):
        self.hf_quantizer = hf_quantizer

    def quantize(self, module: nn.Module, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) of the checkpoint weight ``value`` for ``module``."""
        raise NotImplementedError

    @torch.no_grad()
    def convert(self, input_dict: dict, model: nn.Module | None = None, full_layer_name: str | None = None, **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        module, _ = get_module_from_name(model, full_layer_name)
        codes, scales = self.quantize(module, value)
        prefix = full_layer_name.rpartition(".")[0]
        return {full_layer_name: codes, f"{prefix}.weight_scale": scales}


class FrozenLinearHfQuantizer(HfQuantizer):
    """An HfQuantizer that puts ``layer_class`` layers in place of linear layers.

    Subclasses set ``layer_class``, ``quantize_op`` (a :class:`QuantizeOnLoad`), ``mark_loaded``
    and ``dequantize_layers`` (functions of the model), and implement :meth:`_swap_layers`.
    """

    requires_calibration = False
    layer_class: type[nn.Module]
    quantize_op: type[QuantizeOnLoad]
    mark_loaded: Callable[[nn.Module], None]
    dequantize_layers: Callable[..., nn.Module]

    @property
    def quantized_element_size(self) -> float:
        # The loader sizes its memory plan with this: INT4 layers need half of it.
        return 1

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, self.layer_class) and tensor_name == "weight"

    def _swap_layers(self, model: nn.Module) -> None:
        """Swap the layers not in ``self.modules_to_not_convert`` for empty ``layer_class`` ones."""
        raise NotImplementedError

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, self.quantization_config.skip_modules, model._keep_in_fp32_modules, add_default_skips=True
        )
        self._swap_layers(model)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        # The float tensors left (embeddings, norms) are views into the checkpoint's mapping,
        # which would keep every page quantization read resident.
        copy_out_of_file_mappings(model)
        self.mark_loaded(model)
        return model

    def get_quantize_ops(self) -> ConversionOps:
        return self.quantize_op(self)

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return self.dequantize_layers(model, dtype=dtype or torch.float32)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Adapters on top (LoRA) train; the quantized weights themselves stay frozen.
        return True


def swap_linear_layers(
    model: nn.Module,
    modules_to_not_convert: list[str],
    is_candidate: Callable[[nn.Module], bool],
    build: Callable[[str, nn.Module], nn.Module],
) -> dict[str, nn.Module]:
    """Put ``build(name, float_layer)``, built on the meta device, in place of every submodule that
    ``is_candidate`` and transformers' skip list allow. Returns the replaced float layers by name."""
    names = [
        name
        for name, module in model.named_modules()
        if name and is_candidate(module) and should_convert_module(name, modules_to_not_convert)
    ]
    replaced = {}
    for name in names:
        float_layer = model.get_submodule(name)
        replaced[name] = float_layer
        with torch.device("meta"):
            layer = build(name, float_layer)
        model.set_submodule(name, layer)
    return replaced


def register_method(
    quant_method: str, config_class: type[QuantizationConfigMixin], quantizer_class: type[HfQuantizer]
) -> None:
    """Register a method with transformers (idempotent; transformers refuses duplicates)."""
    if quant_method not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(quant_method)(config_class)
    if quant_method not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(quant_method)(quantizer_class)
