"""Text that exists on every machine with Python: the standard library's own source.

Read at run time, never copied into the repository. The split is by file so the held-out text is
code the model never saw: every tenth file (in sorted order) is held out.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

HELDOUT_EVERY = 10


def stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python source files found in the standard library at {root}")
    return files


def stdlib_text(split: str = "train", max_chars: int | None = None) -> str:
    """Concatenated stdlib source for ``split`` ("train" or "heldout"), cut at ``max_chars``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want_heldout = split == "heldout"
    parts, total = [], 0
    for i, path in enumerate(stdlib_source_files()):
        if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) != want_heldout:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    joined = "\n".join(parts)
    return joined if max_chars is None else joined[:max_chars]
