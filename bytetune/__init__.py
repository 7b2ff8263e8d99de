"""bytetune: LoRA fine-tuning on LLM.int8() bases with block-wise 8-bit optimizers."""

__version__ = "0.1.0"

# Importing quant_layers registers the Int8Config quantization method with transformers, which
# must happen in every process that loads or saves an int8 model.
from bytetune.quant_layers import Int8Config, Int8Linear, QuantizationReport, quantize_model  # noqa: E402

__all__ = ["Int8Config", "Int8Linear", "QuantizationReport", "quantize_model"]
