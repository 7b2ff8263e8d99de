"""bytetune.optim: block-wise 8-bit optimizers (arXiv 2110.02861) and StableEmbedding."""

from bytetune.optim.optimizers import (
    Adam8bit,
    AdamW8bit,
    Lion8bit,
    SGD8bit,
    mark_32bit_state,
    state_bytes_per_param,
)
from bytetune.optim.stable_embedding import StableEmbedding

__all__ = [
    "Adam8bit",
    "AdamW8bit",
    "Lion8bit",
    "SGD8bit",
    "StableEmbedding",
    "mark_32bit_state",
    "state_bytes_per_param",
]
