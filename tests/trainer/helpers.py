"""Shared settings for the trainer tests: the recipes as written, small, writing under tmp_path."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = str(REPO / "train.py")
STALL_WRAPPER = str(REPO / "tests" / "stall_checkpoint_write.py")


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


def with_stalled_checkpoint_write(command: list[str], step: int = 4, seconds: float = 120) -> list[str]:
    """``command`` (which runs train.py, directly or under a launcher) with train.py replaced by
    tests/stall_checkpoint_write.py: the step-``step`` checkpoint write sleeps ``seconds`` once
    its adapter is on disk."""
    assert command.count(TRAIN_PY) == 1, f"no single {TRAIN_PY} in {command}"
    at = command.index(TRAIN_PY)
    return [*command[:at], STALL_WRAPPER, str(step), str(seconds), *command[at + 1:]]


def start_until_checkpoint_write(
    command: list[str], run_dir: Path, env: dict, kill=kill_9, **popen
) -> tuple[subprocess.Popen, Path]:
    """Start a training command whose step-4 checkpoint write stalls (with_stalled_checkpoint_write)
    and return once that write is under way: (the process, the half-written checkpoint directory).
    The caller kills the process; if the write never starts, ``kill`` does before the error rises."""
    popen = popen or dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = subprocess.Popen(with_stalled_checkpoint_write(command), cwd=REPO, env=env, **popen)
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


def free_port() -> int:
    """A TCP port nobody listens on now, for a test's rendezvous: a fixed port makes two test runs
    on one machine (two checkouts, a developer and CI) fail each other."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
