"""The training objective: next-token cross-entropy summed over target tokens.

Returning the sum and the count (not a mean) is what lets the trainer weight every target token
equally across micro-batches and ranks: a micro-batch with 3 target tokens and one with 300 give
the gradient of one batch holding both (the bug HF fixed with ``num_items_in_batch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bytetune.trainer.data import IGNORE_INDEX


def target_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens a causal LM is scored on: labels shifted by one, less the ignored ones."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def summed_token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross-entropy over target tokens in float32, their count)."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    loss_sum = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, target_token_count(labels)
