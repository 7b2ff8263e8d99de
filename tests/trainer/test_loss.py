"""Token-weighted loss: every target token of an optimizer step weighs the same, however the
micro-batches split them."""

from __future__ import annotations

import pytest
import torch

from bytetune.recipe import load_recipe
from bytetune.trainer.data import IGNORE_INDEX
from bytetune.trainer.loss import summed_token_loss
from bytetune.trainer.trainer import Trainer, build_model

from .helpers import tiny_overrides

SEQ_LEN = 320


def ragged_rows(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows: one scored on 3 tokens, one on 300 (instruction data with ragged responses)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, vocab, (2, SEQ_LEN), generator=generator)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, -3:] = input_ids[0, -3:]
    labels[1, -300:] = input_ids[1, -300:]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def step_gradients(tmp_path, micro_batch: int, accum: int) -> dict[str, torch.Tensor]:
    overrides = tiny_overrides(tmp_path, **{
        "training.micro_batch_size": micro_batch, "training.grad_accum_steps": accum,
        "training.seq_len": SEQ_LEN, "training.max_grad_norm": None, "lora.dropout": 0.0,
        "data.eval": None,
    })
    cfg = load_recipe("tiny_lora8", overrides)
    model, tokenizer = build_model(cfg)
    trainer = Trainer(model, tokenizer, ragged_rows(model.config.vocab_size), cfg, memory_plan=None)
    captured = {}

    def capture():
        captured.update({n: p.grad.clone() for n, p in trainer.unwrapped.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    trainer._train_step()
    return captured


@pytest.mark.usefixtures("one_thread")
def test_two_ragged_micro_batches_give_the_gradient_of_one_batch(tmp_path):
    split = step_gradients(tmp_path / "split", micro_batch=1, accum=2)
    whole = step_gradients(tmp_path / "whole", micro_batch=2, accum=1)
    assert split and split.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_summed_loss_matches_the_mean_cross_entropy_times_the_count():
    torch.manual_seed(0)
    vocab = 11

    class Logits(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids, vocab).float() * 3.0})()

    ids = torch.randint(0, vocab, (3, 9))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    summed, count = summed_token_loss(Logits(), {"input_ids": ids, "labels": labels})
    logits = Logits()(ids).logits[:, :-1]
    mean = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert count == (labels[:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(summed / count, mean)
