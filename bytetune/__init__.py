"""bytetune: LoRA fine-tuning on LLM.int8() bases with block-wise 8-bit optimizers."""

__version__ = "0.1.0"

from bytetune.optim import Adam8bit, AdamW8bit, Lion8bit, SGD8bit, StableEmbedding  # noqa: E402

__all__ = ["Adam8bit", "AdamW8bit", "Lion8bit", "SGD8bit", "StableEmbedding"]
