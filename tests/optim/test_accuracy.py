"""Accuracy on a real small problem: a tiny Llama-architecture byte-level LM trained 300 steps on
English-like text generated in the test (tests/synthetic_text.py: the same bytes on every host);
every 8-bit optimizer ends within 2 % of its 32-bit counterpart (torch.optim for Adam/AdamW/SGD,
bytetune's own optim_bits=32 path for Lion).

Hyper-parameters sit inside the stable region, where the gap reflects the 8-bit states and not
which way rounding tips a run at the edge of divergence: SGD at lr=0.3 (and stdlib text) ended
4.5 % above 32-bit on one host, while bitsandbytes' 8-bit SGD ended 3 % below it on the same data.
Measured here (shared 2-core Xeon, one thread), 8-bit vs 32-bit held-out loss: adam 1.6841 vs
1.6915, adamw 1.6803 vs 1.6883, sgd 2.1667 vs 2.1671, lion 1.8458 vs 1.8244 (+1.2 %)."""

import pytest
import torch

from bytetune.optim import Adam8bit, AdamW8bit, Lion8bit, SGD8bit
from tests.synthetic_text import synthetic_text

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
        lambda ps: SGD8bit(ps, lr=0.1, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    ),
    "lion": (
        lambda ps: Lion8bit(ps, lr=5e-4, weight_decay=0.1),
        lambda ps: Lion8bit(ps, lr=5e-4, weight_decay=0.1, optim_bits=32),
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and immune to other processes sharing the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    def as_bytes(n_chars, seed):
        raw = synthetic_text(n_chars, seed).encode("ascii")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()

    train, heldout = as_bytes(400_000, seed=1), as_bytes(50_000, seed=2)
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
