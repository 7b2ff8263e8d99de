"""bytetune: LoRA fine-tuning on LLM.int8() bases with block-wise 8-bit optimizers."""

__version__ = "0.1.0"
