"""Accuracy on a real small problem: a tiny Llama-architecture byte-level LM trained 300 steps on
Python standard-library source; every 8-bit optimizer ends within 2 % of its 32-bit counterpart
(torch.optim for Adam/AdamW/SGD, bytetune's own optim_bits=32 path for Lion)."""

import pytest
import torch

from bytetune.optim import Adam8bit, AdamW8bit, Lion8bit, SGD8bit
from bytetune.trainer.local_text import stdlib_text

STEPS, BATCH, SEQ = 300, 8, 64

PAIRS = {
    "adam": (
        lambda ps: Adam8bit(ps, lr=3e-3, weight_decay=1e-4),
        lambda ps: torch.optim.Adam(ps, lr=3e-3, weight_decay=1e-4),
    ),
    "adamw": (
        lambda ps: AdamW8bit(ps, lr=3e-3, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1),
    ),
    "sgd": (
        lambda ps: SGD8bit(ps, lr=0.3, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, nesterov=True),
    ),
    "lion": (
        lambda ps: Lion8bit(ps, lr=5e-4, weight_decay=0.1),
        lambda ps: Lion8bit(ps, lr=5e-4, weight_decay=0.1, optim_bits=32),
    ),
}


@pytest.fixture(scope="module")
def data():
    def as_bytes(split, n_chars):
        raw = stdlib_text(split, max_chars=n_chars).encode("utf-8", errors="replace")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()

    train, heldout = as_bytes("train", 400_000), as_bytes("heldout", 50_000)
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, train.numel() - SEQ - 1, (STEPS, BATCH), generator=gen)
    train_batches = [torch.stack([train[s : s + SEQ + 1] for s in row.tolist()]) for row in starts]
    eval_starts = torch.randint(0, heldout.numel() - SEQ - 1, (4, BATCH), generator=gen)
    eval_batches = [torch.stack([heldout[s : s + SEQ + 1] for s in row.tolist()]) for row in eval_starts]
    return train_batches, eval_batches


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _loss(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


def _train_and_eval(make_optimizer, data):
    train_batches, eval_batches = data
    model = _tiny_lm()
    opt = make_optimizer(model.parameters())
    for batch in train_batches:
        opt.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        opt.step()
    with torch.no_grad():
        return sum(_loss(model, b).item() for b in eval_batches) / len(eval_batches), opt


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAIRS))
def test_8bit_final_loss_within_2_percent_of_32bit(name, data):
    make_8bit, make_32bit = PAIRS[name]
    loss_8bit, opt = _train_and_eval(make_8bit, data)
    loss_32bit, _ = _train_and_eval(make_32bit, data)
    quantized = sum(p.numel() for p, s in opt.state.items() if s["state1"].dtype == torch.uint8)
    total = sum(p.numel() for group in opt.param_groups for p in group["params"])
    assert quantized / total > 0.95, "the test must exercise 8-bit states on the main weights"
    assert loss_32bit < 0.8 * 5.545, "the 32-bit run must actually learn (uniform bytes: ln 256 = 5.545)"
    print(f"{name}: heldout loss 8-bit {loss_8bit:.4f} vs 32-bit {loss_32bit:.4f}")
    assert abs(loss_8bit - loss_32bit) <= 0.02 * loss_32bit
