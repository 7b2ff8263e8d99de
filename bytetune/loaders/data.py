"""Training data: plain text packed into seq_len blocks, or prompt/response pairs.

Sources: "stdlib" (this Python's standard-library source, read at run time), a local
.txt/.json/.jsonl/.parquet file, or a hub dataset name. Each becomes a ``datasets.Dataset`` and is
tokenized with ``Dataset.map(batched=True)``, whose Arrow cache file (named by a key of everything
that changes the result) makes a second run skip tokenization. Every source ends as
:class:`TokenBlocks`: equal-length rows of input ids, labels (-100 where no loss is taken) and
attention mask. Instruction data goes through the tokenizer's chat template when it has one.

A stdlib split cut by ``max_chars`` is sampled, not truncated: windows of ``STDLIB_WINDOW_CHARS``
spread evenly over the whole split (many files), so a short run trains on, and a short eval
measures, the library rather than its alphabetically first files.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from bytetune.kernels.constants import IGNORE_INDEX
from bytetune.loaders.local_text import stdlib_source_files, stdlib_text
from bytetune.recipe.schema import RecipeError, is_local_path

STDLIB_WINDOW_CHARS = 2000  # one sample: a few functions' worth of source

MAP_BATCH_ROWS = 1000  # documents per datasets.map batch
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(RecipeError):
    """Data that cannot train: missing file, empty split, unusable fields."""


# Tokens that can stand between packed documents when a tokenizer has no EOS, in order of preference.
SEPARATOR_ROLES = ("sep_token", "bos_token", "pad_token", "cls_token")


def choose_document_separator(tokenizer) -> None:
    """Documents are packed with EOS between them and responses end with it: a tokenizer without
    one gets its separator, beginning-of-sequence or padding token as EOS (stated in a warning),
    and a tokenizer with none of them is an error (the id would be None, -2**63 in the batch)."""
    if tokenizer.eos_token_id is not None:
        return
    for role in SEPARATOR_ROLES:
        token = getattr(tokenizer, role, None)
        if token is not None and tokenizer.convert_tokens_to_ids(token) is not None:
            tokenizer.eos_token = token
            warnings.warn(f"the tokenizer has no eos token: its {role} {token!r} (id {tokenizer.eos_token_id}) "
                          "separates packed documents and ends responses")
            return
    raise RecipeError(
        "the tokenizer has neither an eos nor a pad (or bos/sep) token, so packed documents would have no "
        "separator: give model.tokenizer one that has an eos token (or model.tokenizer=bytes)"
    )


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


def _load_rows(source: str, split: str, role: str, max_samples: int | None, fields: tuple[str, ...]):
    """A ``datasets.Dataset`` for a local file or hub dataset; clear errors for missing ones."""
    path = Path(source).expanduser()
    if path.suffix in LOCAL_BUILDERS or is_local_path(source):
        if not path.is_file():
            raise DataError(f"data.{role} file {source!r} does not exist")
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"data.{role} file {source!r}: unsupported type, use one of {', '.join(LOCAL_BUILDERS)}")
        # a local file is a split of its own: everything in it is that split
        rows = _read_local(path, builder, role, fields, max_samples)
    else:
        try:
            rows = datasets.load_dataset(source, split=split)
        except Exception as error:
            raise DataError(f"data.{role}={source!r} (split {split!r}) could not be loaded: {str(error).splitlines()[0]}") from None
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return rows


def _fields(data_cfg) -> tuple[str, ...]:
    """The fields every row of the recipe's data format must hold, as strings."""
    if data_cfg.format == "instruction":
        return (data_cfg.prompt_field, data_cfg.response_field)
    return (data_cfg.text_field,)


_FIELD_KEYS = {"text": "data.text_field", "prompt": "data.prompt_field", "response": "data.response_field"}


def _field_key(fields: tuple[str, ...], name: str) -> str:
    """The recipe key that names ``name`` (data.text_field, data.prompt_field, ...)."""
    roles = ("text",) if len(fields) == 1 else ("prompt", "response")
    return _FIELD_KEYS[roles[fields.index(name)]]


def _utf8_text(path: Path, role: str) -> str:
    """The file as text; a byte that is not UTF-8, or a file with nothing in it, is one line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"data.{role} file {str(path)!r} line {line}: byte {raw[error.start]:#04x} at offset {error.start} is not "
            "UTF-8 text: convert the file to UTF-8 (e.g. iconv -t UTF-8)"
        ) from None
    if not text.strip():
        raise DataError(f"data.{role} file {str(path)!r} is empty: give a file with at least one row")
    return text


def _json_rows(text: str, path: Path, role: str):
    """(where, row) for each row of a .json/.jsonl file: JSON lines, or one JSON array of
    objects / one object of columns (``where`` is "line N" or "row N")."""
    if path.suffix == ".json" and text.lstrip()[:1] in "[{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # maybe JSON lines after all: read line by line below
        if isinstance(whole, list):
            yield from ((f"row {i + 1}", row) for i, row in enumerate(whole))
            return
        if isinstance(whole, dict) and whole and all(isinstance(v, list) for v in whole.values()):
            count = max(len(v) for v in whole.values())
            yield from ((f"row {i + 1}", {k: v[i] for k, v in whole.items() if i < len(v)}) for i in range(count))
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"data.{role} file {str(path)!r} line {number}: invalid JSON ({error.msg} at column {error.colno}): "
                "fix the line (one JSON object per line)"
            ) from None


# The last local files read (path, size, mtime, fields, max_samples) -> rows: check_data_files reads
# them before the model loads, build_token_blocks then takes the same rows without a second parse.
_LOCAL_READS: dict[tuple, datasets.Dataset] = {}


def check_data_files(data_cfg) -> None:
    """Read and check every row of the recipe's local data files (train and eval) before any
    model loads: bad JSON, bad encoding, empty files and missing or non-string fields fail in
    seconds, not after minutes of model loading. Hub datasets are checked when they are loaded."""
    for role in ("train", "eval"):
        source = data_cfg.get(role)
        if source is None or source == "stdlib":
            continue
        path = Path(source).expanduser()
        if path.suffix in LOCAL_BUILDERS and path.is_file():
            max_samples = data_cfg.max_train_samples if role == "train" else data_cfg.max_eval_samples
            rows = _load_rows(source, "train", role, max_samples, _fields(data_cfg))
            _check_columns(rows, _fields(data_cfg), role, source)


def _read_local(path: Path, builder: str, role: str, fields: tuple[str, ...], max_samples: int | None) -> datasets.Dataset:
    """A local file as a ``datasets.Dataset``, every row checked as it is read: the file is UTF-8
    and not empty, each JSON line parses and holds every field the format needs as a string."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, fields, max_samples, builder)
    if key not in _LOCAL_READS:
        if len(_LOCAL_READS) >= 2:  # train and eval: no more rows kept than one run reads
            _LOCAL_READS.pop(next(iter(_LOCAL_READS)))
        _LOCAL_READS[key] = _read_local_uncached(path, builder, role, fields, max_samples)
    return _LOCAL_READS[key]


def _read_local_uncached(path: Path, builder: str, role: str, fields: tuple[str, ...], max_samples: int | None) -> datasets.Dataset:
    if builder == "parquet":
        if path.stat().st_size == 0:
            raise DataError(f"data.{role} file {str(path)!r} is empty: give a file with at least one row")
        # read with pyarrow directly: datasets logs a traceback of its own for a broken file
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as error:  # pyarrow's errors for a file that is not parquet
            raise DataError(f"data.{role} file {str(path)!r} could not be read as parquet: {str(error).splitlines()[0]}") from None
        for name in fields:
            if name not in names:
                raise DataError(f"data.{role} file {str(path)!r}: no field {name!r} in {names} (set {_field_key(fields, name)})")
        table = pq.read_table(path, columns=list(fields))
        if max_samples is not None:
            table = table.slice(0, max_samples)
        return datasets.Dataset(table)
    if builder == "text" and len(fields) > 1:
        raise DataError(f"data.{role} file {str(path)!r} is plain text but data.format=instruction needs rows with "
                        f"{fields[0]!r} and {fields[1]!r}: give a .jsonl/.json/.parquet file, or data.format=text")
    text = _utf8_text(path, role)
    if builder == "text":  # one document per line, as datasets' text builder reads it
        return datasets.Dataset.from_dict({fields[0]: text.splitlines()})
    columns: dict[str, list[str]] = {name: [] for name in fields}
    for where, row in _json_rows(text, path, role):
        if max_samples is not None and len(columns[fields[0]]) >= max_samples:
            break
        if not isinstance(row, dict):
            raise DataError(f"data.{role} file {str(path)!r} {where}: a row must be a JSON object with "
                            f"{', '.join(map(repr, fields))}, got {type(row).__name__}")
        for name in fields:
            if name not in row:
                raise DataError(
                    f"data.{role} file {str(path)!r} {where}: no field {name!r} (the row has "
                    f"{', '.join(map(repr, row)) or 'no fields'}; set {_field_key(fields, name)})"
                )
            if not isinstance(row[name], str):
                raise DataError(
                    f"data.{role} file {str(path)!r} {where}: field {name!r} is {_json_type(row[name])}, not a string"
                )
            columns[name].append(row[name])
    if not columns[fields[0]]:
        raise DataError(f"data.{role} file {str(path)!r} has no rows: give a file with at least one row")
    return datasets.Dataset.from_dict(columns)


def _json_type(value) -> str:
    return "null" if value is None else {bool: "a boolean", int: "a number", float: "a number", list: "a list",
                                         dict: "an object"}.get(type(value), type(value).__name__)


def _check_columns(rows: datasets.Dataset, fields: tuple[str, ...], role: str, source: str) -> None:
    """Every field the format needs is a column of strings with no nulls (parquet files and hub
    datasets; local JSON files were checked row by row as they were read)."""
    if len(rows) == 0:
        raise DataError(f"data.{role}={source!r} has no rows: give data with at least one row")
    for name in fields:
        if name not in rows.column_names:
            raise DataError(f"data.{role}={source!r}: no field {name!r} in {rows.column_names} (set {_field_key(fields, name)})")
        feature = rows.features[name]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            kind = getattr(feature, "dtype", None) or type(feature).__name__
            raise DataError(f"data.{role}={source!r}: field {name!r} holds {kind}, not strings (set {_field_key(fields, name)})")
        column = rows.data.column(name)
        if column.null_count:
            first = next(i for i, value in enumerate(column.is_null().to_pylist()) if value)
            raise DataError(f"data.{role}={source!r} row {first + 1}: field {name!r} is null, not a string")


def _packer(tokenizer, seq_len: int, text_field: str):
    """A batched map function: tokenize documents, join them with EOS, cut full seq_len blocks.

    The stream restarts at each map batch (``MAP_BATCH_ROWS`` documents), so at most one partial
    block per batch is dropped.
    """

    def pack(batch: dict) -> dict:
        stream: list[int] = []
        for ids in tokenizer([t for t in batch[text_field] if t], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
        n_blocks = len(stream) // seq_len
        blocks = [stream[i * seq_len : (i + 1) * seq_len] for i in range(n_blocks)]
        return {"input_ids": blocks, "labels": blocks, "attention_mask": [[1] * seq_len] * n_blocks}

    return pack


def _prompt_and_response_ids(tokenizer, cfg, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (no loss) and of the response (loss), through the tokenizer's chat
    template when it has one and data.chat_template allows it, else through data.template."""
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prompt_ids = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False))
        full = list(tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": response}], tokenize=True, return_dict=False
        ))
        # Templates render the conversation so far identically, so the prompt is a prefix.
        if full[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, full[len(prompt_ids):]
    prompt_ids = tokenizer(cfg.template.format(prompt=prompt), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(prompt_ids), list(response_ids)


def _instruction_encoder(tokenizer, cfg, seq_len: int):
    """A batched map function: prompt then response, padded to seq_len; loss on the response."""

    # padding is masked out of attention and loss: any real id does, EOS when there is no pad
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(batch: dict) -> dict:
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for prompt, response in zip(batch[cfg.prompt_field], batch[cfg.response_field]):
            prompt_ids, response_ids = _prompt_and_response_ids(tokenizer, cfg, str(prompt), str(response))
            ids = (prompt_ids + response_ids)[:seq_len]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:seq_len]
            if all(label == IGNORE_INDEX for label in labels):
                continue  # the prompt alone fills seq_len: nothing to learn from this row
            padding = seq_len - len(ids)
            out["input_ids"].append(ids + [pad_id] * padding)
            out["labels"].append(labels + [IGNORE_INDEX] * padding)
            out["attention_mask"].append([1] * len(ids) + [0] * padding)
        return out

    return encode


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
    choose_document_separator(tokenizer)  # a tokenizer given through the Python API too
    key_parts = [
        _source_fingerprint(source, split), f"spread-windows{STDLIB_WINDOW_CHARS}", _tokenizer_fingerprint(tokenizer), str(seq_len), data_cfg.format,
        str(max_chars), str(max_samples), data_cfg.text_field, data_cfg.prompt_field, data_cfg.response_field,
        data_cfg.template, str(data_cfg.chat_template and bool(getattr(tokenizer, "chat_template", None))),
        str(MAP_BATCH_ROWS),
    ]
    key = hashlib.sha256("\x00".join(key_parts).encode()).hexdigest()[:24]
    cache_file = Path(data_cfg.cache_dir).expanduser() / f"{role}-{key}.arrow" if data_cfg.cache_dir else None
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    rows = _raw_rows(source, split, data_cfg, role, max_chars, max_samples)
    if data_cfg.format == "instruction":
        for field_name in (data_cfg.prompt_field, data_cfg.response_field):
            if field_name not in rows.column_names:
                raise DataError(
                    f"data.{role}: instruction format needs field {field_name!r}; the data has {rows.column_names} "
                    "(set data.prompt_field / data.response_field)"
                )
        encode = _instruction_encoder(tokenizer, data_cfg, seq_len)
    else:
        encode = _packer(tokenizer, seq_len, data_cfg.text_field)
    # The cache file is named by our key (not by datasets' hash of the function), so a second run
    # of the same recipe loads it whatever Python or dill make of the closure.
    tokenized = rows.map(
        encode, batched=True, batch_size=MAP_BATCH_ROWS, remove_columns=rows.column_names,
        cache_file_name=str(cache_file) if cache_file is not None else None,
        new_fingerprint=key, desc=f"tokenizing {role} data",
    )
    blocks = _as_blocks(tokenized, seq_len)
    if len(blocks) == 0 and data_cfg.format == "instruction":
        shortest_prompt, shortest_row = _shortest_instruction_row(rows, tokenizer, data_cfg)
        raise DataError(
            f"data.{role}={source!r}: every row's prompt fills training.seq_len={seq_len} (the shortest prompt is "
            f"{shortest_prompt} tokens, the shortest whole row {shortest_row}), so no response token is left to learn: "
            f"raise training.seq_len to at least {shortest_prompt + 1} ({shortest_row} keeps the shortest row whole)"
        )
    if len(blocks) == 0:
        raise DataError(
            f"data.{role}={source!r} gives no sequences of seq_len={seq_len}: the split is empty or too short "
            "(add data, or lower training.seq_len)"
        )
    targets = int((blocks.labels[:, 1:] != IGNORE_INDEX).sum())
    if targets == 0:
        raise DataError(
            f"data.{role}={source!r} gives {len(blocks)} sequences of seq_len={seq_len} but no target token "
            "(each token is predicted from the ones before it): raise training.seq_len"
        )
    return blocks


def _shortest_instruction_row(rows: datasets.Dataset, tokenizer, data_cfg) -> tuple[int, int]:
    """(tokens of the shortest prompt, tokens of the shortest prompt + response) over the rows:
    what training.seq_len must reach (only computed for the error)."""
    shortest_prompt = shortest_row = None
    for prompt, response in zip(rows[data_cfg.prompt_field], rows[data_cfg.response_field]):
        prompt_ids, response_ids = _prompt_and_response_ids(tokenizer, data_cfg, prompt, response)
        shortest_prompt = len(prompt_ids) if shortest_prompt is None else min(shortest_prompt, len(prompt_ids))
        whole = len(prompt_ids) + len(response_ids)
        shortest_row = whole if shortest_row is None else min(shortest_row, whole)
    return shortest_prompt or 0, shortest_row or 0


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


def _raw_rows(source, split, data_cfg, role, max_chars, max_samples) -> datasets.Dataset:
    """The split as a ``datasets.Dataset`` of documents or prompt/response rows, cut to the
    recipe's character / sample budget."""
    if source == "stdlib":
        return datasets.Dataset.from_dict({data_cfg.text_field: stdlib_windows(split, max_chars)})
    rows = _load_rows(source, split, role, max_samples, _fields(data_cfg))
    _check_columns(rows, _fields(data_cfg), role, source)
    if data_cfg.format == "instruction":
        return rows
    if data_cfg.text_field not in rows.column_names:
        raise DataError(f"data.{role}: no field {data_cfg.text_field!r} in {rows.column_names} (set data.text_field)")
    if max_chars is None:
        return rows.select_columns([data_cfg.text_field])
    texts, total = [], 0
    for text in rows[data_cfg.text_field]:
        texts.append(text)
        total += len(text or "")
        if total >= max_chars:
            break
    if texts and total > max_chars:
        texts[-1] = texts[-1][: len(texts[-1]) - (total - max_chars)]
    return datasets.Dataset.from_dict({data_cfg.text_field: texts})


def _as_blocks(tokenized: datasets.Dataset, seq_len: int) -> TokenBlocks:
    if len(tokenized) == 0:
        return TokenBlocks(*(torch.zeros(0, seq_len, dtype=torch.long) for _ in range(3)))
    columns = tokenized.with_format("torch")[:]  # every row, as one tensor per column
    return TokenBlocks(*(columns[name].to(torch.long) for name in ("input_ids", "labels", "attention_mask")))


# Calibration batches (python -m bytetune.lkd). Characters of stdlib text read per calibration
# token when data.max_train_chars is unset: BPE tokenizers take ~3.5 characters a token, byte
# tokenizers one.
STDLIB_CHARS_PER_TOKEN = 8


def random_batches(n_batches: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_batches`` token batches [batch_size, seq_len] of uniform ids below ``vocab_size``."""
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab_size, (n_batches, batch_size, seq_len), generator=generator))


def text_batches(data_cfg, tokenizer, n_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """``n_batches`` token batches [batch_size, seq_len] of the training split of ``data_cfg``
    (tokenized and packed as the trainer does), rows spread evenly over the split."""
    from omegaconf import OmegaConf

    needed = n_batches * batch_size
    if data_cfg.train == "stdlib" and data_cfg.max_train_chars is None:
        data_cfg = OmegaConf.merge(data_cfg, {"max_train_chars": needed * seq_len * STDLIB_CHARS_PER_TOKEN})
    blocks = build_token_blocks(data_cfg, tokenizer, seq_len, "train")
    if len(blocks) < needed:
        raise RecipeError(
            f"data.train={data_cfg.train!r} gives {len(blocks)} sequences of {seq_len} tokens; LKD needs "
            f"lkd.n_batches x lkd.batch_size = {needed}: add data (data.max_train_chars) or lower lkd.n_batches, "
            "lkd.batch_size or training.seq_len"
        )
    rows = torch.linspace(0, len(blocks) - 1, needed).round().long()
    return list(blocks.input_ids[rows].reshape(n_batches, batch_size, seq_len))
