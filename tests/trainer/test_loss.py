"""Token-weighted loss: every target token of an optimizer step weighs the same, however the
micro-batches split them."""

from __future__ import annotations

import pytest
import torch

from bytetune.recipe import load_recipe
from bytetune.loaders.data import IGNORE_INDEX
from bytetune.trainer.loss import summed_token_loss
from bytetune.trainer.trainer import Trainer, build_model

from ..tolerances import assert_close_to_scale
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
        assert_close_to_scale(split[name], whole[name], rtol=1e-4, scale_rtol=1e-5, msg=name)


def test_summed_loss_matches_the_mean_cross_entropy_times_the_count():
    torch.manual_seed(0)
    vocab = 11

    class Logits(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids, vocab).float() * 3.0})()

    ids = torch.randint(0, vocab, (3, 9))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    summed, count = summed_token_loss(Logits(), {"input_ids": ids, "labels": labels}, fused=False)
    logits = Logits()(ids).logits[:, :-1]
    mean = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert count == (labels[:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(summed / count, mean)


# ------------------------------------------------------------------- fused linear + cross-entropy
def tiny_causal_lm(kind: str, tied: bool, vocab: int = 301):
    from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    else:
        config = BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config)


def peft_of(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    # init_lora_weights=False: random B too, so every adapter weight has a nonzero gradient
    return get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))


def labelled_batch(vocab: int):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (3, 23), generator=generator)
    labels = ids.clone()
    labels[0, :9] = IGNORE_INDEX  # a prompt
    labels[2, :] = IGNORE_INDEX  # a row with nothing to score
    labels[1, 5] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("chunk", [6, None])
@pytest.mark.parametrize("kind,tied", [("bloom", True), ("llama", True), ("llama", False)])
def test_fused_loss_equals_hf_loss_times_count_with_equal_gradients(kind, tied, chunk, monkeypatch):
    from bytetune.kernels import fused_linear_ce

    if chunk is not None:  # chunks that do not divide the 35 target tokens
        monkeypatch.setattr(fused_linear_ce, "default_chunk_tokens", lambda *args, **kwargs: chunk)
    model = peft_of(tiny_causal_lm(kind, tied))
    batch = labelled_batch(301)
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    (hf.loss * count).backward()
    expected = adapter_grads(model)
    model.zero_grad()
    summed, counted = summed_token_loss(model, batch)
    summed.backward()
    assert counted == count == 14 + 21  # row 0: 22 - 8 prompt tokens; row 1: 22 - 1; row 2: none
    torch.testing.assert_close(summed, (hf.loss * count).detach(), rtol=1e-5, atol=1e-5)
    got = adapter_grads(model)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        assert_close_to_scale(got[name], expected[name], rtol=1e-5, msg=name)


@pytest.mark.usefixtures("one_thread")
def test_fused_loss_never_builds_the_full_logits(monkeypatch):
    model = peft_of(tiny_causal_lm("llama", tied=True))
    head = model.get_base_model().get_output_embeddings()
    seen = []
    head.register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape)))
    batch = labelled_batch(301)
    summed_token_loss(model, batch)
    summed_token_loss(model, batch)
    # the model's own head ran on the last position only; the second call skips the check too
    assert all(shape[:2] == (3, 1) for shape in seen if len(shape) == 3)
    assert not any(len(shape) == 3 and shape[1] > 1 for shape in seen)


@pytest.mark.usefixtures("one_thread")
def test_fused_loss_with_int8_embeddings_equals_the_plain_path():
    from bytetune.quant_layers.int8_embedding import quantize_embeddings

    base = tiny_causal_lm("bloom", tied=True)
    quantize_embeddings(base)
    model = peft_of(base)
    batch = labelled_batch(301)
    plain, _ = summed_token_loss(model, batch, fused=False)
    plain.backward()
    expected = adapter_grads(model)
    model.zero_grad()
    fused, _ = summed_token_loss(model, batch)
    fused.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name, grad in adapter_grads(model).items():
        assert_close_to_scale(grad, expected[name], rtol=1e-5, msg=name)


@pytest.mark.usefixtures("one_thread")
def test_a_model_that_scales_its_logits_falls_back_to_the_plain_path_with_one_warning():
    model = tiny_causal_lm("llama", tied=False)
    inner_forward = model.forward

    def scaled_forward(*args, **kwargs):  # like Cohere's logit_scale / Gemma's soft-capping
        out = inner_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled_forward
    batch = labelled_batch(301)
    with pytest.warns(UserWarning, match="fused cross-entropy is off"):
        summed, count = summed_token_loss(model, batch)
    expected = torch.nn.functional.cross_entropy(
        (model(input_ids=batch["input_ids"]).logits[:, :-1]).reshape(-1, 301), batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(summed, expected)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        summed_token_loss(model, batch)


def test_a_config_that_soft_caps_the_logits_takes_the_plain_path():
    model = tiny_causal_lm("llama", tied=True)
    model.config.final_logit_softcapping = 30.0  # as Gemma 2's config says
    batch = labelled_batch(301)
    with pytest.warns(UserWarning, match="soft-caps"):
        summed, count = summed_token_loss(model, batch)
    plain, plain_count = summed_token_loss(model, batch, fused=False)
    assert count == plain_count
    torch.testing.assert_close(summed, plain)


@pytest.mark.usefixtures("one_thread")
def test_trainer_losses_equal_with_fused_cross_entropy_off(tmp_path):
    def first_losses(fused: bool):
        overrides = tiny_overrides(tmp_path / str(fused), **{
            "training.max_steps": 2, "training.fused_cross_entropy": fused, "lora.dropout": 0.0, "data.eval": None,
            "quantization.embeddings": "int8", "checkpoint.every_steps": 0,
        })
        trainer = Trainer.from_recipe("tiny_lora8", **overrides)
        return [trainer._train_step()[0] for _ in range(2)]  # the second after one optimizer step

    fused, plain = first_losses(True), first_losses(False)
    assert len(fused) == 2
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-5, atol=1e-6)
