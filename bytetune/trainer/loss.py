"""The training objective: next-token cross-entropy summed over target tokens.

Returning the sum and the count (not a mean) is what lets the trainer weight every target token
equally across micro-batches and ranks: a micro-batch with 3 target tokens and one with 300 give
the gradient of one batch holding both (the bug HF fixed with ``num_items_in_batch``).

The default path is fused (:func:`bytetune.quant_layers.head_loss.head_cross_entropy`, over the
head's own storage, float or int8): the model runs through its usual forward (so DDP, PEFT and accelerate's hooks all see the call)
with ``logits_to_keep=1`` and ``output_hidden_states=True``; the last hidden states go through the
head in token chunks, so the ``[tokens, vocab]`` float32 logits and their gradient never exist.
The first call on a model checks that the head applied to the last hidden state reproduces the
model's own last-position logits (it would not for a model that scales or soft-caps its logits);
a model that fails the check, or whose head cannot be found, takes the plain path, with one warning.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from bytetune.loaders.data import IGNORE_INDEX
from bytetune.quant_layers.head_loss import fusable_head, head_cross_entropy

# Models already checked: True = fused path verified, False = plain path (warned once).
_FUSED_OK: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def target_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Tokens a causal LM is scored on: labels shifted by one, less the ignored ones."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def plain_summed_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the CE from the model's full ``[batch, seq, vocab]`` logits (the reference)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return _summed_ce_of_logits(logits, batch["labels"])


def _summed_ce_of_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / accelerate / PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP and friends
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def head_of(model: nn.Module) -> nn.Linear | None:
    """The output head if the fused path can use it: a bias-free float nn.Linear or an Int8Head."""
    if isinstance(model, FSDPModule):
        # FSDP2 hands the root group (embeddings, head) back sharded after the forward; gathering
        # it for the chunked loss outside the forward is not wired up yet.
        return None
    inner = causal_lm(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head if fusable_head(head) else None


# Config attributes of transformers models whose logits are not the plain head output.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _transforms_logits(inner: nn.Module) -> bool:
    config = getattr(inner, "config", None)
    values = [getattr(config, name, None) for name in _LOGIT_TRANSFORMS]
    return any(value is not None and value != 1 for value in values)


def _head_loss(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return head_cross_entropy(head, hidden, targets)


def _fall_back(model: nn.Module, reason: str) -> None:
    warnings.warn(f"fused cross-entropy is off for this model ({reason}); the loss materializes the full logits",
                  stacklevel=3)
    _FUSED_OK[causal_lm(model)] = False


def summed_token_loss(model, batch: dict[str, torch.Tensor], fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross-entropy over target tokens in float32, their count).

    ``fused``: chunked loss from the last hidden states (see the module docstring); False, or a
    model the fused path does not fit, computes it from the full logits.
    """
    labels = batch["labels"]
    count = target_token_count(labels)
    inner = causal_lm(model)
    known = _FUSED_OK.get(inner) if isinstance(inner, nn.Module) else False
    head = head_of(model) if fused and known is not False else None
    if head is None:
        if fused and known is None:
            _fall_back(model, "no bias-free nn.Linear / Int8Head output head found, or an FSDP2-sharded model")
        return plain_summed_loss(model, batch), count
    if known is None and _transforms_logits(inner):
        _fall_back(model, "its config scales or soft-caps the logits after the head")
        return plain_summed_loss(model, batch), count

    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                logits_to_keep=1, output_hidden_states=True)
    hidden_states = getattr(out, "hidden_states", None)
    if hidden_states is None or out.logits.shape[1] != 1:
        # The model ignored logits_to_keep/output_hidden_states: it paid for the full logits already.
        _fall_back(model, "the model ignores logits_to_keep or output_hidden_states")
        return _summed_ce_of_logits(out.logits, labels), count
    last = hidden_states[-1]
    if not known:
        verdict = None  # undecided on non-finite logits: the step is skipped anyway
        if last.shape[-1] != head.in_features:
            verdict = False
        elif torch.isfinite(out.logits).all():
            with torch.no_grad():
                expected = out.logits[:, -1].float()
                # head.forward, not head(...): the same computation without firing the head's hooks
                got = head.forward(last[:, -1].to(head.weight.device)).float().to(expected.device)
                # 16-bit logits: the two products may round a unit in the last place apart
                tolerance = 1e-4 if out.logits.dtype == torch.float32 else 2e-2
                verdict = torch.allclose(got, expected, rtol=tolerance, atol=tolerance)
        if verdict is False:
            _fall_back(model, "the head applied to the last hidden state does not reproduce the model's logits")
            return plain_summed_loss(model, batch), count
        if verdict:
            _FUSED_OK[inner] = True
    hidden = last[:, :-1].reshape(-1, last.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    return _head_loss(head, hidden, targets), count
