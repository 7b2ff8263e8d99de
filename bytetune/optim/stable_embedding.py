"""StableEmbedding (arXiv 2110.02861): an embedding with xavier-uniform init followed by a
LayerNorm, whose weight keeps 32-bit optimizer states in every bytetune optimizer."""

from __future__ import annotations

import torch
from torch import nn

from bytetune.optim.optimizers import mark_32bit_state


class StableEmbedding(nn.Embedding):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
            sparse, device=device, dtype=dtype,
        )  # fmt: skip
        self.norm = nn.LayerNorm(embedding_dim, device=device, dtype=dtype)
        mark_32bit_state(self.weight)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        embedded = super().forward(input)
        # The norm runs in fp32: its statistics are what keeps 16-bit training stable.
        normed = nn.functional.layer_norm(
            embedded.float(), self.norm.normalized_shape, self.norm.weight.float(), self.norm.bias.float(), self.norm.eps
        )
        return normed.to(self.weight.dtype)
