"""bytetune: LoRA fine-tuning on LLM.int8() bases with block-wise 8-bit optimizers."""

__version__ = "0.1.0"

# Importing quant_layers registers the Int8Config quantization method with transformers, which
# must happen in every process that loads or saves an int8 model.
from bytetune.quant_layers import (  # noqa: E402
    GroupQuantLinear,
    Int8Config,
    Int8Linear,
    QuantizationReport,
    ZeroQuantConfig,
    quantize_model,
    quantize_model_zeroquant,
)

__all__ = [
    "GroupQuantLinear",
    "Int8Config",
    "Int8Linear",
    "QuantizationReport",
    "ZeroQuantConfig",
    "quantize_model",
    "quantize_model_zeroquant",
]
