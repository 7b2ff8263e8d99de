"""Data: packing, response-only loss, local files, the cache, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from bytetune.recipe.schema import DataConfig
from bytetune.loaders.data import IGNORE_INDEX, DataError, as_token_blocks, build_token_blocks
from bytetune.loaders.models import byte_tokenizer


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


def test_tokenization_is_cached(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("some text to cache " * 20)
    cfg = data_cfg(tmp_path, train=str(path))
    first = build_token_blocks(cfg, tokenizer, seq_len=16, role="train")
    assert len(list((tmp_path / "cache").glob("train-*.arrow"))) == 1
    # a second build must come from the cache: the tokenizer is not called again
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenized again"))
    second = build_token_blocks(cfg, tokenizer, seq_len=16, role="train")
    assert torch.equal(second.input_ids, first.input_ids)
    monkeypatch.undo()
    # a different seq_len is a different key
    assert build_token_blocks(cfg, tokenizer, seq_len=8, role="train").seq_len == 8


def test_instruction_format_uses_the_chat_template_when_the_tokenizer_has_one(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "response": "yo"}))
    blocks = build_token_blocks(data_cfg(tmp_path, train=str(path), format="instruction"), tokenizer, 40, "train")
    prompt_ids = tokenizer("<user>hi</s><assistant>", add_special_tokens=False)["input_ids"]
    full_ids = tokenizer("<user>hi</s><assistant>yo</s>", add_special_tokens=False)["input_ids"]
    assert blocks.input_ids[0, : len(full_ids)].tolist() == full_ids
    labels = blocks.labels[0].tolist()
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) : len(full_ids)] == full_ids[len(prompt_ids):]
    # data.chat_template=false keeps the recipe's own template
    plain = build_token_blocks(
        data_cfg(tmp_path, train=str(path), format="instruction", chat_template=False, template="Q: {prompt}\nA: "),
        tokenizer, 40, "train",
    )
    assert plain.input_ids[0, :3].tolist() == tokenizer("Q: ", add_special_tokens=False)["input_ids"]


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


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """200 generated source files of varied sizes in place of this Python's stdlib, so the
    sampling tests see the same split on every host (the real stdlib's files differ between
    Python versions and builds)."""
    from tests.synthetic_text import synthetic_text

    root = tmp_path / "fake_stdlib"
    root.mkdir()
    files = []
    for index in range(200):
        path = root / f"module_{index:03d}.py"
        text = synthetic_text(1500 + (index * 7919) % 9000, seed=100 + index)
        path.write_text("\n".join(f"# {line}" for line in text.split(". ")) + "\n")
        files.append(path)
    monkeypatch.setattr("bytetune.loaders.local_text.stdlib_source_files", lambda: files)
    monkeypatch.setattr("bytetune.loaders.data.stdlib_source_files", lambda: files)
    return files


def test_stdlib_heldout_sample_spreads_over_the_whole_split(fake_stdlib):
    from bytetune.loaders.data import STDLIB_WINDOW_CHARS, stdlib_windows
    from bytetune.loaders.local_text import HELDOUT_EVERY, stdlib_source_files

    heldout_files = [p for i, p in enumerate(stdlib_source_files()) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in heldout_files]
    whole = "\n".join(texts)
    budget = 10 * STDLIB_WINDOW_CHARS + 123
    windows = stdlib_windows("heldout", budget)
    assert sum(len(w) for w in windows) == budget
    assert len(windows) == 11
    offsets = [whole.index(w) for w in windows]
    assert offsets == sorted(offsets)
    assert all(o == 0 or whole[o - 1] == "\n" for o in offsets), "windows start at line starts"
    # the first window opens the split and the last one reaches into its final file
    assert offsets[0] == 0
    assert offsets[-1] + len(windows[-1]) > len(whole) - len(texts[-1])
    # a truncating cut of the same budget would stay inside the first few files
    file_starts = [0]
    for text in texts[:-1]:
        file_starts.append(file_starts[-1] + len(text) + 1)
    files_touched = {sum(start <= o for start in file_starts) for o in offsets}
    assert len(files_touched) >= 8
    assert stdlib_windows("heldout", None) == [whole]


def test_stdlib_eval_blocks_come_from_the_spread_sample(tmp_path, tokenizer, fake_stdlib):
    from bytetune.loaders.data import stdlib_windows

    blocks = build_token_blocks(data_cfg(tmp_path, max_eval_chars=5000), tokenizer, seq_len=64, role="eval")
    stream = []
    for window in stdlib_windows("heldout", 5000):
        stream += tokenizer(window, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // 64
    assert blocks.input_ids.flatten().tolist() == stream[: n * 64]
