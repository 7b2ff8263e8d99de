"""LLM.int8() layers, whole-model conversion, quantize-on-load for transformers, LoRA via PEFT.

Importing this package registers the ``bytetune_int8`` and ``bytetune_zeroquant`` (ZeroQuant,
group-wise INT8/INT4) quantization methods with transformers.
"""

from bytetune.quant_layers.convert import QuantizationReport, dequantize_model, model_bytes, quantize_model
from bytetune.quant_layers.hf_quantizer import Int8HfQuantizer
from bytetune.quant_layers.int8_config import Int8Config
from bytetune.quant_layers.group_linear import GroupQuantLinear
from bytetune.quant_layers.int8_linear import Int8Linear
from bytetune.quant_layers.zeroquant import quantize_model_zeroquant
from bytetune.quant_layers.zeroquant_hf import ZeroQuantConfig, ZeroQuantHfQuantizer

__all__ = [
    "GroupQuantLinear",
    "Int8Config",
    "Int8HfQuantizer",
    "Int8Linear",
    "QuantizationReport",
    "dequantize_model",
    "model_bytes",
    "quantize_model",
    "quantize_model_zeroquant",
    "ZeroQuantConfig",
    "ZeroQuantHfQuantizer",
]
