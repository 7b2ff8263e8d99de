"""One rank of the FSDP tests (started twice by torchrun from test_fsdp.py).

argv: OUT_JSON TMP_DIR RECIPE [key=value overrides]. Runs the recipe under FSDP straight through,
then (with --resume-check) again stopped after step 2 and resumed from its checkpoint; rank 0
writes what the test compares: losses, full adapter weights, each rank's int8 bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bytetune.recipe import load_recipe
from bytetune.trainer import distributed
from bytetune.trainer.trainer import Trainer

torch.set_num_threads(1)


def run(recipe: str, overrides: dict, stop_after_step: int | None = None) -> Trainer:
    trainer = Trainer.from_config(load_recipe(recipe, overrides))
    trainer.train(stop_after_step=stop_after_step)
    return trainer


def main() -> None:
    out, tmp, recipe, *rest = sys.argv[1:]
    resume_check = "--resume-check" in rest
    overrides = dict(arg.split("=", 1) for arg in rest if arg != "--resume-check")
    tmp = Path(tmp)
    straight = run(recipe, {**overrides, "output_dir": str(tmp / "straight")})
    result = {
        "losses": [h["loss"] for h in straight.history],
        "eval_loss": straight.eval_history[-1]["eval_loss"],
        "adapter": {k: v.tolist() for k, v in distributed.trainable_state(straight.unwrapped).items()},
        # set when the base was built empty and each rank read its shard from the checkpoint
        "loaded_shard_by_shard": straight.deferred_base is not None,
    }
    int8_bytes = torch.tensor([distributed.local_frozen_int8_bytes(straight.unwrapped)])
    gathered = [torch.zeros_like(int8_bytes) for _ in range(straight.world)]
    torch.distributed.all_gather(gathered, int8_bytes)
    result["int8_bytes_per_rank"] = [int(t) for t in gathered]
    if resume_check:
        resumed_dir = str(tmp / "resumed")
        first = run(recipe, {**overrides, "output_dir": resumed_dir}, stop_after_step=2)
        assert first.step == 2
        del first
        resumed = run(recipe, {**overrides, "output_dir": resumed_dir, "checkpoint.resume": "true"})
        result["resumed_losses"] = [h["loss"] for h in resumed.history]
        result["resumed_adapter"] = {k: v.tolist() for k, v in distributed.trainable_state(resumed.unwrapped).items()}
    if straight.accelerator.is_main_process:
        Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
