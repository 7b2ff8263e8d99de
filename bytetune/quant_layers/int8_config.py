"""The ``bytetune_int8`` quantization config: what an LLM.int8() model records in its config.json
and what ``from_pretrained(..., quantization_config=Int8Config())`` asks for."""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from bytetune.quant_layers.int8_linear import DEFAULT_THRESHOLD

QUANT_METHOD = "bytetune_int8"


class Int8Config(QuantizationConfigMixin):
    """LLM.int8() quantization of every linear layer while loading.

    Args:
        threshold: outlier threshold of each Int8Linear (0 = pure vector-wise quantization).
        skip_modules: module names (or prefixes, suffixes, regexes, as transformers matches them)
            kept in their original precision, on top of the output head and tied embeddings,
            which are always kept.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, skip_modules: list[str] | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.threshold = float(threshold)
        self.skip_modules = list(skip_modules) if skip_modules is not None else None
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (0 turns outlier columns off), got {threshold}")
