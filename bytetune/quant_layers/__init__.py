"""LLM.int8() layers, whole-model conversion, quantize-on-load for transformers, LoRA via PEFT.

Importing this package registers the ``bytetune_int8`` quantization method with transformers.
"""

from bytetune.quant_layers.convert import QuantizationReport, dequantize_model, model_bytes, quantize_model
from bytetune.quant_layers.hf_quantizer import Int8Config, Int8HfQuantizer
from bytetune.quant_layers.int8_linear import Int8Linear

__all__ = [
    "Int8Config",
    "Int8HfQuantizer",
    "Int8Linear",
    "QuantizationReport",
    "dequantize_model",
    "model_bytes",
    "quantize_model",
]
