"""Atomic, resumable checkpoints.

A checkpoint is ``<output_dir>/checkpoints/step-<NNNNNNNN>/`` holding the PEFT adapter files, the
optimizer state (8-bit when the optimizer is), the scheduler, every rank's RNG states, and
``trainer_state.json`` (step, data position, counters, loss history, model fingerprint). It is
written into a ``.tmp-`` directory and renamed into place, so a process killed mid-write leaves the
previous checkpoint as the latest one and only a stray ``.tmp-`` directory, which the next save
removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bytetune.recipe.schema import RecipeError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
# Test hook, "STEP:SECONDS": while writing the checkpoint of STEP, sleep SECONDS inside the
# temporary directory after the adapter files are written (the kill -9 test kills it then).
WRITE_DELAY_ENV = "BYTETUNE_CHECKPOINT_SLEEP_AT"


class CheckpointError(RecipeError):
    """No checkpoint to resume, or one that does not belong to this run's model."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never match)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """None for a fresh start; the checkpoint directory to continue from otherwise."""
    if resume is None or str(resume).lower() in ("false", "no", "0", ""):
        return None
    if str(resume).lower() in ("true", "latest", "yes", "1"):
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"checkpoint.resume={resume}: no checkpoint in {checkpoints_dir(output_dir)} "
                "(start without resume, or point checkpoint.resume at a checkpoint directory)"
            )
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint.resume={resume!r} is not a checkpoint directory (no {STATE_FILE} in it)")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f".tmp-step-{step:08d}"


def final_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step:08d}"


def begin(output_dir: str | Path, step: int) -> Path:
    """Main process: a clean temporary directory for the checkpoint of ``step``."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stray in root.glob(".tmp-*"):  # left by a killed run
        shutil.rmtree(stray, ignore_errors=True)
    temporary = temporary_dir(output_dir, step)
    temporary.mkdir()
    return temporary


def write_main(temporary: Path, unwrapped_model, optimizer, scheduler, state: dict) -> None:
    """Main process: adapter, optimizer, scheduler, then the state file that marks completeness."""
    unwrapped_model.save_pretrained(temporary)
    write_delay_hook(state["step"])
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
    (temporary / STATE_FILE).write_text(json.dumps(state, indent=1))


def write_delay_hook(step: int) -> None:
    """The test hook of WRITE_DELAY_ENV: sleep inside the checkpoint write of that step."""
    hook = os.environ.get(WRITE_DELAY_ENV)
    if hook:
        hook_step, seconds = hook.split(":")
        if int(hook_step) == step:
            time.sleep(float(seconds))


def write_rank_rng(temporary: Path, rank: int) -> None:
    torch.save(rng_state(), temporary / f"rng_rank{rank}.pt")


def commit(temporary: Path, output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Main process: rename into place (atomic), then drop all but the newest ``keep_last``."""
    final = final_dir(output_dir, step)
    if final.exists():  # a re-run of the same step (resume from an earlier one): replace it
        shutil.rmtree(final)
    os.replace(temporary, final)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def load_rank_rng(checkpoint: Path, rank: int) -> None:
    path = checkpoint / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} has no RNG state for rank {rank}: it was written by fewer processes")
    set_rng_state(torch.load(path, weights_only=False))
