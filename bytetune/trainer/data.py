"""Training data: plain text packed into seq_len blocks, or prompt/response pairs.

Sources: "stdlib" (this Python's standard-library source, read at run time), a local
.txt/.json/.jsonl/.parquet file, or a hub dataset name, all read with ``datasets`` except stdlib.
Every source ends as :class:`TokenBlocks`: equal-length rows of input ids, labels (-100 where no
loss is taken) and attention mask. Tokenized blocks are cached on disk, keyed by everything that
changes them.

A stdlib split cut by ``max_chars`` is sampled, not truncated: windows of ``STDLIB_WINDOW_CHARS``
spread evenly over the whole split (many files), so a short run trains on, and a short eval
measures, the library rather than its alphabetically first files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bytetune.recipe.schema import RecipeError
from .local_text import stdlib_source_files, stdlib_text

STDLIB_WINDOW_CHARS = 2000  # one sample: a few functions' worth of source

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(RecipeError):
    """Data that cannot train: missing file, empty split, unusable fields."""


@dataclass
class TokenBlocks:
    """Equal-length token rows; ``dataset[i]`` is a dict, ``dataset.batch(indices)`` stacks rows."""

    input_ids: torch.Tensor  # [n, seq_len] int64
    labels: torch.Tensor  # [n, seq_len] int64, IGNORE_INDEX where no loss is taken
    attention_mask: torch.Tensor  # [n, seq_len] int64

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index], "attention_mask": self.attention_mask[index]}

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[indices], "labels": self.labels[indices], "attention_mask": self.attention_mask[indices]}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def as_token_blocks(data) -> TokenBlocks:
    """Accept TokenBlocks, a dict of tensors, or a sequence of dicts of equal-length rows."""
    if isinstance(data, TokenBlocks):
        return data
    if isinstance(data, dict):
        rows = data
    else:
        if len(data) == 0:
            raise DataError("the dataset is empty: give at least one sequence")
        rows = {key: torch.stack([torch.as_tensor(item[key]) for item in data]) for key in data[0]}
    if "input_ids" not in rows:
        raise DataError(f"dataset rows need 'input_ids' (and optionally 'labels', 'attention_mask'); got {sorted(rows)}")
    input_ids = torch.as_tensor(rows["input_ids"], dtype=torch.long)
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise DataError(f"dataset input_ids must be a non-empty [n, seq_len] table, got shape {tuple(input_ids.shape)}")
    labels = torch.as_tensor(rows.get("labels", input_ids), dtype=torch.long)
    mask = torch.as_tensor(rows.get("attention_mask", torch.ones_like(input_ids)), dtype=torch.long)
    return TokenBlocks(input_ids, labels, mask)


def _source_fingerprint(source: str, split: str) -> str:
    """What identifies the raw data: the stdlib's files, a local file's size+mtime, or a hub name."""
    if source == "stdlib":
        files = stdlib_source_files()
        return f"stdlib:{sys.version}:{split}:{len(files)}:{sum(f.stat().st_size for f in files)}"
    path = Path(source).expanduser()
    if path.exists():
        stat = path.stat()
        return f"file:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"hub:{source}:{split}"


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16] + f":{tokenizer.eos_token_id}"


def _load_rows(source: str, split: str, role: str, max_samples: int | None):
    """A ``datasets.Dataset`` for a local file or hub dataset; clear errors for missing ones."""
    import datasets

    path = Path(source).expanduser()
    if path.suffix in LOCAL_BUILDERS or source.startswith(("/", "./", "../", "~")):
        if not path.is_file():
            raise DataError(f"data.{role} file {source!r} does not exist")
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"data.{role} file {source!r}: unsupported type, use one of {', '.join(LOCAL_BUILDERS)}")
        # a local file is a split of its own: everything in it is that split
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        try:
            rows = datasets.load_dataset(source, split=split)
        except Exception as error:
            raise DataError(f"data.{role}={source!r} (split {split!r}) could not be loaded: {str(error).splitlines()[0]}") from None
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return rows


def _pack_text(texts, tokenizer, seq_len: int) -> TokenBlocks:
    """Tokenize documents, join them with EOS, and cut the stream into full seq_len blocks."""
    stream: list[int] = []
    for text in texts:
        if text:
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // seq_len
    ids = torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return TokenBlocks(ids, ids.clone(), torch.ones_like(ids))


def _instruction_rows(rows, tokenizer, cfg, seq_len: int, role: str) -> TokenBlocks:
    """Prompt through the template, then the response; loss on the response (and EOS) only."""
    for field_name in (cfg.prompt_field, cfg.response_field):
        if field_name not in rows.column_names:
            raise DataError(
                f"data.{role}: instruction format needs field {field_name!r}; the data has {rows.column_names} "
                "(set data.prompt_field / data.response_field)"
            )
    input_rows, label_rows, mask_rows = [], [], []
    for row in rows:
        prompt = tokenizer(cfg.template.format(prompt=row[cfg.prompt_field]), add_special_tokens=False)["input_ids"]
        response = tokenizer(str(row[cfg.response_field]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # the prompt alone fills seq_len: nothing to learn from this row
        padding = seq_len - len(ids)
        input_rows.append(ids + [tokenizer.pad_token_id] * padding)
        label_rows.append(labels + [IGNORE_INDEX] * padding)
        mask_rows.append([1] * len(ids) + [0] * padding)
    if not input_rows:
        return TokenBlocks(*(torch.zeros(0, seq_len, dtype=torch.long) for _ in range(3)))
    return TokenBlocks(torch.tensor(input_rows), torch.tensor(label_rows), torch.tensor(mask_rows))


def build_token_blocks(data_cfg, tokenizer, seq_len: int, role: str) -> TokenBlocks:
    """The ``train`` or ``eval`` split of the recipe's data, tokenized (from the cache if present)."""
    if seq_len <= 0:
        raise DataError(f"training.seq_len must be > 0, got {seq_len}")
    source = data_cfg.train if role == "train" else data_cfg.eval
    split = data_cfg.train_split if role == "train" else data_cfg.eval_split
    max_chars = data_cfg.max_train_chars if role == "train" else data_cfg.max_eval_chars
    max_samples = data_cfg.max_train_samples if role == "train" else data_cfg.max_eval_samples
    if source == "stdlib" and data_cfg.format != "text":
        raise DataError(f"data.{role}=stdlib is plain text: use data.format=text")
    key_parts = [
        _source_fingerprint(source, split), f"spread-windows{STDLIB_WINDOW_CHARS}", _tokenizer_fingerprint(tokenizer), str(seq_len), data_cfg.format,
        str(max_chars), str(max_samples), data_cfg.text_field, data_cfg.prompt_field, data_cfg.response_field,
        data_cfg.template,
    ]
    key = hashlib.sha256("\x00".join(key_parts).encode()).hexdigest()[:24]
    cache_file = Path(data_cfg.cache_dir).expanduser() / f"{role}-{key}.pt" if data_cfg.cache_dir else None
    if cache_file is not None and cache_file.is_file():
        blocks = TokenBlocks(**torch.load(cache_file))
    else:
        blocks = _tokenize(source, split, data_cfg, tokenizer, seq_len, role, max_chars, max_samples)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache_file.with_name(f".tmp-{cache_file.name}-{os.getpid()}")
            torch.save(vars(blocks), temporary)
            temporary.replace(cache_file)
    if len(blocks) == 0:
        raise DataError(
            f"data.{role}={source!r} gives no sequences of seq_len={seq_len}: the split is empty or too short "
            "(add data, or lower training.seq_len)"
        )
    return blocks


def stdlib_windows(split: str, max_chars: int | None) -> list[str]:
    """``max_chars`` of a stdlib split ("train" or "heldout") as windows spread evenly over it.

    Each window starts at a line start (so no token is cut) and is its own document (packed with
    an EOS after it). ``None`` or a budget at least the split's size gives the whole split.
    """
    text = stdlib_text(split)
    if max_chars is None or max_chars >= len(text):
        return [text]
    if max_chars <= 0:
        raise DataError(f"the character budget of the stdlib {split} split must be > 0, got {max_chars}")
    n_windows = -(-max_chars // STDLIB_WINDOW_CHARS)
    width = -(-max_chars // n_windows)
    span = len(text) - width
    windows, remaining = [], max_chars
    for i in range(n_windows):
        # back to the start of the line, which keeps the window inside the split
        start = text.rfind("\n", 0, span * i // max(n_windows - 1, 1)) + 1
        windows.append(text[start : start + min(width, remaining)])
        remaining -= len(windows[-1])
    return windows


def _tokenize(source, split, data_cfg, tokenizer, seq_len, role, max_chars, max_samples) -> TokenBlocks:
    if source == "stdlib":
        return _pack_text(stdlib_windows(split, max_chars), tokenizer, seq_len)
    rows = _load_rows(source, split, role, max_samples)
    if data_cfg.format == "instruction":
        return _instruction_rows(rows, tokenizer, data_cfg, seq_len, role)
    if data_cfg.text_field not in rows.column_names:
        raise DataError(f"data.{role}: no field {data_cfg.text_field!r} in {rows.column_names} (set data.text_field)")
    texts, total = [], 0
    for text in rows[data_cfg.text_field]:
        texts.append(text)
        total += len(text or "")
        if max_chars is not None and total >= max_chars:
            break
    if max_chars is not None and texts:
        texts[-1] = texts[-1][: len(texts[-1]) - (total - max_chars)] if total > max_chars else texts[-1]
    return _pack_text(texts, tokenizer, seq_len)
