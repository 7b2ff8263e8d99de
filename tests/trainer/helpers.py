"""Shared settings for the trainer tests: the tiny recipe, small and fast, writing under tmp_path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _has(module: str, name: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    return hasattr(__import__(module, fromlist=[name]), name)


# The int8 layers and 8-bit optimizers come from other parts of bytetune; the trainer tests run the
# recipes as written when those are installed, and the fp32 path (same loop) when not.
HAS_INT8 = _has("bytetune.quant_layers", "quantize_model")
HAS_OPTIM8 = _has("bytetune.optim", "AdamW8bit")


def tiny_overrides(tmp_path: Path, **extra) -> dict:
    overrides = {
        "output_dir": str(tmp_path / "run"),
        "data.cache_dir": str(tmp_path / "data_cache"),
        "logging.progress_bar": False,
        "logging.plot": False,
    }
    if not HAS_INT8:
        overrides["quantization.int8"] = False
    if not HAS_OPTIM8:
        overrides["optimizer.name"] = "adamw"
    overrides.update(extra)
    return overrides


def as_cli(overrides: dict) -> list[str]:
    return [f"{key}={value}" for key, value in overrides.items()]
