"""LoRA on Int8Linear through PEFT.

PEFT already wraps an Int8Linear (an nn.Linear subclass) with its plain LoRA layer, and training,
saving and loading adapters work that way. What plain PEFT gets wrong is merging: it would add the
float delta to the int8 codes. :class:`LoraInt8Linear` merges by dequantize -> add delta ->
requantize; it is dispatched through PEFT's (experimental) custom-module registry, which lives on
each LoraConfig and is not saved in adapter_config.json. So build configs with :func:`lora_config`
(or pass yours through :func:`register_int8_lora`) and load adapters with :func:`load_adapter`.
:func:`merge_and_requantize` and :func:`export_merged` work whichever LoRA class wraps the layer.

Adapter files are standard PEFT files: the LoRA weights of an Int8Linear have the same names and
shapes as those of the nn.Linear it replaced, so plain ``PeftModel.from_pretrained`` loads them
onto the unquantized model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from bytetune.quant_layers.convert import dequantize_model, dequantized_linear, forget_quantization
from bytetune.quant_layers.experts_lora import register_experts_lora
from bytetune.quant_layers.int8_linear import Int8Linear
from bytetune.quant_layers.shards import local_rows, local_tensor


class LoraInt8Linear(LoraLinear):
    """PEFT's LoRA Linear on an Int8Linear base; only merging differs.

    Merge and unmerge go through the dequantized weight and requantize it, so each costs one
    rounding of the weight (an unmerge does not give back the exact original codes).
    """

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter in self.lora_A:
                _add_delta_to_int8_base(self, adapter, sign=1.0, safe=safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                _add_delta_to_int8_base(self, adapter, sign=-1.0, safe=False)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # PEFT moves new adapters to their base layer's device. A base still on the meta device
        # (built empty; an FSDP rank or a pipeline stage fills it later) would take the adapters'
        # seeded initial weights with it: this layer keeps a copy, by parameter name, until
        # restore_initial_adapters() puts them back.
        if self.get_base_layer().weight.device.type == "meta":
            for name, param in self.named_parameters():
                if f".{adapter_name}." in f".{name}" and param.device.type != "meta":
                    self._initial_adapters[name] = param.detach().clone()
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)

    @property
    def _initial_adapters(self) -> dict[str, torch.Tensor]:
        # created on first use: PEFT's __init__ draws (and moves) the adapters before an
        # __init__ of ours could set anything; read and cleared by restore_initial_adapters only
        return self.__dict__.setdefault("_initial_adapter_copies", {})

    @torch.no_grad()
    def restore_initial_adapters(self) -> list[torch.Tensor]:
        """Once the model around this layer is allocated (``to_empty``, possibly FSDP2-sharded):
        copy this rank's rows of the adapters' initial weights, kept while the base was on the
        meta device, into their parameters, and forget the copies. Returns the parameters
        filled (none when the adapters were drawn on a real base)."""
        filled = []
        for name, initial in self.__dict__.pop("_initial_adapter_copies", {}).items():
            param = self.get_parameter(name)
            start, end = local_rows(param)
            local_tensor(param).copy_(initial[start:end])
            filled.append(param)
        return filled


@torch.no_grad()
def _add_delta_to_int8_base(layer: LoraLayer, adapter: str, sign: float, safe: bool) -> None:
    if adapter in getattr(layer, "lora_variant", {}):
        raise NotImplementedError(
            f"adapter {adapter!r} uses a LoRA variant (e.g. DoRA); merging it into an Int8Linear is not "
            "supported: merge plain LoRA adapters, or export_merged() after dequantizing"
        )
    base: Int8Linear = layer.get_base_layer()
    weight = base.dequantized_weight(torch.float32)
    weight += sign * layer.get_delta_weight(adapter).float().to(weight.device)
    if safe and not torch.isfinite(weight).all():
        raise ValueError(f"NaNs/infs in the merged weight: adapter {adapter!r} seems to be broken")
    base.set_weight(weight)
    if layer.lora_bias[adapter]:
        if base.bias is None:
            raise RuntimeError("cannot merge lora_bias=True into a layer without bias")
        base.bias += sign * (layer.lora_B[adapter].bias * layer.scaling[adapter]).to(base.bias.dtype)


def register_int8_lora(config: LoraConfig) -> LoraConfig:
    """Make PEFT wrap Int8Linear layers with LoraInt8Linear (and Int8Experts' parameters with
    LoraInt8Experts) under this config; returns it."""
    config._register_custom_module({Int8Linear: LoraInt8Linear})
    return register_experts_lora(config)


def lora_config(**kwargs) -> LoraConfig:
    """``LoraConfig(**kwargs)`` with Int8Linear's LoRA layer registered."""
    return register_int8_lora(LoraConfig(**kwargs))


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False, adapter_name: str = "default"
) -> PeftModel:
    """``PeftModel.from_pretrained`` with Int8Linear's LoRA layer re-registered on the config
    read from ``adapter_dir`` (the registration is not saved in adapter_config.json)."""
    config = register_int8_lora(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable, config=config
    )


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    upcast_fp32: bool = False,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """Freeze the base model and make it ready for LoRA training on int8 layers.

    Like PEFT's ``prepare_model_for_kbit_training`` (which also works on our models, as they say
    ``is_loaded_in_8bit``), except that 16-bit parameters are only cast to fp32 when
    ``upcast_fp32`` is set: PEFT always casts, which on a large vocabulary doubles the embedding
    and head memory. With gradient checkpointing the embeddings' output requires grad, so the
    checkpointed blocks have something to differentiate even though every base weight is frozen.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if upcast_fp32:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    return model


def _lora_layers(peft_model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merge_and_requantize(peft_model: PeftModel) -> nn.Module:
    """Merge the active adapters into the int8 base (dequantize -> add delta -> requantize) and
    return the base model without LoRA layers. Works whichever LoRA class wraps an Int8Linear."""
    for _, layer in _lora_layers(peft_model):
        if isinstance(layer.get_base_layer(), Int8Linear) and not isinstance(layer, LoraInt8Linear):
            for adapter in check_adapters_to_merge(layer, None):
                if adapter in layer.lora_A:
                    _add_delta_to_int8_base(layer, adapter, sign=1.0, safe=True)
                    layer.merged_adapters.append(adapter)
        else:
            layer.merge(safe_merge=True)
    return peft_model.unload()


@torch.no_grad()
def merged_16bit_model(peft_model: PeftModel, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The base model with the active adapters merged into 16-bit (``dtype``) linear layers.

    Each Int8Linear with an adapter becomes nn.Linear(dequant(W) + delta) in ``dtype``, without
    requantizing; every other Int8Linear is dequantized. Consumes ``peft_model``.
    """
    for name, layer in _lora_layers(peft_model):
        base = layer.get_base_layer()
        if not isinstance(base, Int8Linear):
            layer.merge(safe_merge=True)
            continue
        weight = base.dequantized_weight(torch.float32)
        bias = None if base.bias is None else base.bias.float()
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            if adapter in getattr(layer, "lora_variant", {}):
                raise NotImplementedError(f"adapter {adapter!r} uses a LoRA variant; only plain LoRA exports")
            weight += layer.get_delta_weight(adapter).float().to(weight.device)
            if layer.lora_bias[adapter]:
                bias = bias + (layer.lora_B[adapter].bias * layer.scaling[adapter]).float()
        # an nn.Linear, or a Conv1D (weight [in, out]) where the base was quantized from one
        float_layer = dequantized_linear(base, dtype, weight=weight)
        if bias is not None:
            float_layer.bias.data = bias.to(dtype)
        # The LoRA wrapper goes away with unload(); its base layer is what gets replaced.
        layer.base_layer = float_layer
    model = dequantize_model(peft_model.unload(), dtype=dtype)
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    forget_quantization(model)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return model


def export_merged(peft_model: PeftModel, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Save the merged 16-bit model (see :func:`merged_16bit_model`) with ``save_pretrained`` to
    ``out_dir``, as a plain transformers checkpoint without a quantization config."""
    model = merged_16bit_model(peft_model, dtype)
    model.save_pretrained(str(out_dir))
    return model
