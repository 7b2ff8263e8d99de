"""The output head's summed cross-entropy without the ``[tokens, vocab]`` logits: the layer side
of the trainer's fused loss.

The head's storage decides the call: a float ``nn.Linear`` passes its weight, an
:class:`~bytetune.quant_layers.int8_embedding.Int8Head` its int8 codes and row scales (its own or
the tied embedding's) to :func:`bytetune.kernels.fused_linear_ce.fused_linear_cross_entropy`. The
trainer asks here, so that it neither knows the head's storage format nor calls a kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from bytetune.kernels.fused_linear_ce import fused_linear_cross_entropy
from bytetune.quant_layers.frozen_linear import FrozenQuantLinear
from bytetune.quant_layers.int8_embedding import Int8Head


def fusable_head(head: nn.Module | None) -> bool:
    """Whether :func:`head_cross_entropy` takes ``head``: a bias-free Int8Head, or a bias-free float
    nn.Linear (not another frozen quantized layer, whose codes it cannot read)."""
    if isinstance(head, Int8Head):
        return head.bias is None
    return isinstance(head, nn.Linear) and not isinstance(head, FrozenQuantLinear) and head.bias is None


def head_cross_entropy(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of CE(head(hidden), targets) in float32, the logits computed in chunks.

    ``hidden`` [tokens, in_features], ``targets`` [tokens] (the ignore index scores nothing);
    both are moved to the head's device. Differentiable in ``hidden`` (and in a float head's
    weight when it trains)."""
    if not fusable_head(head):
        raise TypeError(f"the fused loss takes a bias-free nn.Linear or Int8Head head, got {type(head).__name__}")
    hidden = hidden.to(head.weight.device)
    targets = targets.to(head.weight.device)
    if isinstance(head, Int8Head):
        return fused_linear_cross_entropy(hidden, targets, w_int8=head.weight, w_scale=head.row_scale)
    return fused_linear_cross_entropy(hidden, targets, weight=head.weight)
