"""Data: packing, response-only loss, local files, the cache, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from bytetune.trainer.config import DataConfig
from bytetune.trainer.data import IGNORE_INDEX, DataError, as_token_blocks, build_token_blocks
from bytetune.trainer.models import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def data_cfg(tmp_path, **values):
    cfg = OmegaConf.structured(DataConfig)
    cfg.cache_dir = str(tmp_path / "cache")
    for key, value in values.items():
        cfg[key] = value
    return cfg


def test_text_is_packed_into_full_blocks_with_eos(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    lines = ["alpha beta", "gamma", "delta epsilon zeta"]
    path.write_text("\n".join(lines) + "\n")
    blocks = build_token_blocks(data_cfg(tmp_path, train=str(path)), tokenizer, seq_len=7, role="train")
    # the datasets text builder gives one row per line; each ends in EOS
    stream = []
    for line in lines:
        stream += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // 7
    assert blocks.input_ids.shape == (n, 7)
    assert blocks.input_ids.flatten().tolist() == stream[: n * 7]
    assert torch.equal(blocks.labels, blocks.input_ids) and bool(blocks.attention_mask.all())


def test_instruction_format_takes_loss_on_response_only(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    rows = [{"q": "add 2 and 3", "a": "5"}, {"q": "capital of France?", "a": "Paris"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = data_cfg(tmp_path, train=str(path), format="instruction", prompt_field="q", response_field="a", template="Q: {prompt}\nA: ")
    blocks = build_token_blocks(cfg, tokenizer, seq_len=40, role="train")
    assert len(blocks) == 2
    for i, row in enumerate(rows):
        prompt_len = len(f"Q: {row['q']}\nA: ".encode())
        response = list(tokenizer(row["a"], add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        labels = blocks.labels[i].tolist()
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len : prompt_len + len(response)] == response
        assert labels[prompt_len + len(response):] == [IGNORE_INDEX] * (40 - prompt_len - len(response))
        assert blocks.attention_mask[i].sum().item() == prompt_len + len(response)


def test_tokenization_is_cached(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("some text to cache " * 20)
    cfg = data_cfg(tmp_path, train=str(path))
    first = build_token_blocks(cfg, tokenizer, seq_len=16, role="train")
    cached = list((tmp_path / "cache").glob("train-*.pt"))
    assert len(cached) == 1
    # poison the cache: a second build must come from it, not from the text
    torch.save({k: v + 1 for k, v in vars(first).items()}, cached[0])
    second = build_token_blocks(cfg, tokenizer, seq_len=16, role="train")
    assert torch.equal(second.input_ids, first.input_ids + 1)
    # a different seq_len is a different key
    assert build_token_blocks(cfg, tokenizer, seq_len=8, role="train").seq_len == 8


def test_stdlib_split_is_held_out(tmp_path, tokenizer):
    cfg = data_cfg(tmp_path, max_train_chars=3000, max_eval_chars=3000)
    train = build_token_blocks(cfg, tokenizer, seq_len=64, role="train")
    heldout = build_token_blocks(cfg, tokenizer, seq_len=64, role="eval")
    assert len(train) > 10 and len(heldout) > 10
    assert not torch.equal(train.input_ids[:10], heldout.input_ids[:10])


def test_missing_file_and_empty_data_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data.train file .*missing.txt.* does not exist"):
        build_token_blocks(data_cfg(tmp_path, train=str(tmp_path / "missing.txt")), tokenizer, 16, "train")
    empty = tmp_path / "empty.txt"
    empty.write_text("tiny\n")
    with pytest.raises(DataError, match="gives no sequences of seq_len=64"):
        build_token_blocks(data_cfg(tmp_path, train=str(empty)), tokenizer, 64, "train")
    with pytest.raises(DataError, match="seq_len must be > 0"):
        build_token_blocks(data_cfg(tmp_path), tokenizer, 0, "train")
    with pytest.raises(DataError, match="empty"):
        as_token_blocks([])
