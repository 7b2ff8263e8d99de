"""LoRA on GroupQuantLinear through PEFT, exactly as for Int8Linear (see quant_layers.lora).

PEFT wraps a GroupQuantLinear (an nn.Linear subclass) with its LoRA Linear; only merging must go
through dequantize -> add delta -> requantize, which :class:`LoraGroupQuantLinear` inherits from
Int8Linear's LoRA layer (both bases expose ``dequantized_weight`` and ``set_weight``). The
registration lives on the LoraConfig and is not saved: build configs with
:func:`zeroquant_lora_config` and re-register before loading adapters.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel
from torch import nn

from bytetune.quant_layers.group_linear import GroupQuantLinear
from bytetune.quant_layers.lora import LoraInt8Linear, register_int8_lora


class LoraGroupQuantLinear(LoraInt8Linear):
    """PEFT's LoRA Linear on a GroupQuantLinear base; merge/unmerge requantize group-wise."""

    def __repr__(self) -> str:
        return "lora.GroupQuant" + nn.Module.__repr__(self)


def register_zeroquant_lora(config: LoraConfig) -> LoraConfig:
    """Make PEFT wrap GroupQuantLinear (and Int8Linear) layers with their merging LoRA layers."""
    register_int8_lora(config)
    config._register_custom_module({GroupQuantLinear: LoraGroupQuantLinear})
    return config


def zeroquant_lora_config(**kwargs) -> LoraConfig:
    """``LoraConfig(**kwargs)`` with GroupQuantLinear's LoRA layer registered."""
    return register_zeroquant_lora(LoraConfig(**kwargs))


def load_zeroquant_adapter(
    model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False, adapter_name: str = "default"
) -> PeftModel:
    """``PeftModel.from_pretrained`` with the registration re-applied to the saved config."""
    config = register_zeroquant_lora(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable, config=config
    )
