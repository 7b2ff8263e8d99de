"""bytetune: LoRA fine-tuning on LLM.int8() bases with block-wise 8-bit optimizers."""

__version__ = "0.1.0"

from bytetune.optim import Adam8bit, AdamW8bit, Lion8bit, SGD8bit, StableEmbedding  # noqa: E402

# Importing quant_layers registers the Int8Config and ZeroQuantConfig quantization methods with
# transformers, which must happen in every process that loads or saves such a model.
from bytetune.quant_layers import (  # noqa: E402
    GroupQuantLinear,
    Int8Config,
    Int8Linear,
    QuantizationReport,
    ZeroQuantConfig,
    quantize_model,
    quantize_model_zeroquant,
)

# The memory planner (bytetune/plan) is loaded on first use of ``bytetune.plan_memory``: it reads
# recipes, which needs omegaconf, and ``import bytetune.kernels`` / ``bytetune.optim`` must work
# without it (the GPU machine's image has no omegaconf until the carried wheels are installed).

__all__ = [
    "Adam8bit", "AdamW8bit", "Lion8bit", "SGD8bit", "StableEmbedding",
    "Int8Config", "Int8Linear", "QuantizationReport", "quantize_model",
    "plan_memory",
    "GroupQuantLinear", "ZeroQuantConfig", "quantize_model_zeroquant",
    "Trainer",
]


def __getattr__(name):
    # The trainer pulls in accelerate, peft, omegaconf and datasets: load it only when asked for.
    if name == "Trainer":
        from bytetune.trainer.trainer import Trainer

        return Trainer
    if name == "plan_memory":
        from bytetune.plan import plan_memory

        return plan_memory
    raise AttributeError(f"module 'bytetune' has no attribute {name!r}")
