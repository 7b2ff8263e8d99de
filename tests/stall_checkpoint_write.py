"""train.py with one checkpoint write stalled, for the tests that kill a run mid-write.

    python tests/stall_checkpoint_write.py STEP SECONDS [train.py arguments ...]

runs train.py (also under torchrun / accelerate launch, in every rank) after wrapping the two
calls a checkpoint write goes through once its adapter is on disk: ``torch.save`` (optimizer,
pipeline stage, scheduler and RNG files) and ``torch.distributed.checkpoint.save`` (FSDP shards).
In the main process (RANK 0, or no RANK), the first such call that writes into the temporary
folder of the step-STEP checkpoint after its adapter_model.safetensors exists sleeps SECONDS
first: the checkpoint stays half-written for that long, which the tests wait for and then kill.
The package itself carries no such hook.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# As `python train.py` has it: the repository first on the path, not tests/ (whose packages would
# shadow installed ones of the same name, e.g. `kernels`, which transformers probes for).
sys.path[0] = str(REPO)

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
ADAPTER_FILE = "adapter_model.safetensors"


def stall_once(step: int, seconds: float):
    """A guard to call with each write's target: sleeps once, before the first write of the main
    process into the half-written step-``step`` checkpoint that follows its adapter."""
    folder_name = f".tmp-step-{step:08d}"
    is_main = os.environ.get("RANK", "0") == "0"
    done = []

    def before_write(target) -> None:
        if done or not is_main or not isinstance(target, (str, os.PathLike)):
            return
        path = Path(target)
        folder = next((p for p in (path, *path.parents) if p.name == folder_name), None)
        if folder is not None and (folder / ADAPTER_FILE).is_file():
            done.append(True)
            time.sleep(seconds)

    return before_write


def wrap(function, before_write, target_of):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        before_write(target_of(args, kwargs))
        return function(*args, **kwargs)

    return wrapped


def main(argv: list[str]) -> None:
    step, seconds, train_args = int(argv[0]), float(argv[1]), argv[2:]
    before_write = stall_once(step, seconds)
    torch.save = wrap(torch.save, before_write, lambda args, kwargs: args[1] if len(args) > 1 else kwargs.get("f"))
    dcp.save = wrap(dcp.save, before_write, lambda args, kwargs: kwargs.get("checkpoint_id"))
    train_py = str(REPO / "train.py")
    sys.argv = [train_py, *train_args]
    runpy.run_path(train_py, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
