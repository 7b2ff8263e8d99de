"""Shared settings for the trainer tests: the recipes as written, small, writing under tmp_path."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bytetune.trainer.checkpoint import WRITE_DELAY_ENV

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


def kill_9(process: subprocess.Popen) -> None:
    process.kill()  # SIGKILL
    process.wait()


def start_until_checkpoint_write(
    command: list[str], run_dir: Path, env: dict, kill=kill_9
) -> tuple[subprocess.Popen, Path]:
    """Start a training command whose step-4 checkpoint write stalls (WRITE_DELAY_ENV) and return
    once that write is under way: (the process, the half-written checkpoint directory). The
    caller kills the process; if the write never starts, ``kill`` does before the error rises."""
    process = subprocess.Popen(command, cwd=REPO, env={**env, WRITE_DELAY_ENV: "4:120"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    half_written = run_dir / "checkpoints" / ".tmp-step-00000004"
    deadline = time.monotonic() + 240
    try:
        while not (half_written / "adapter_model.safetensors").is_file():
            assert process.poll() is None, "training ended before the step-4 checkpoint write"
            assert time.monotonic() < deadline, "step-4 checkpoint write never started"
            time.sleep(0.2)
    except BaseException:
        kill(process)
        raise
    return process, half_written
