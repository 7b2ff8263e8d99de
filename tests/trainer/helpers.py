"""Shared settings for the trainer tests: the recipes as written, small, writing under tmp_path."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(tmp_path: Path, **extra) -> dict:
    overrides = {
        "output_dir": str(tmp_path / "run"),
        "data.cache_dir": str(tmp_path / "data_cache"),
        "logging.progress_bar": False,
        "logging.plot": False,
    }
    overrides.update(extra)
    return overrides


def as_cli(overrides: dict) -> list[str]:
    return [f"{key}={value}" for key, value in overrides.items()]
