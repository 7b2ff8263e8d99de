"""Runs as separate processes: kill -9 during a checkpoint write, and DDP over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bytetune.trainer.checkpoint import list_checkpoints

from .helpers import REPO, free_port, as_cli, kill_9, start_until_checkpoint_write, tiny_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
FAST = {"training.max_steps": 4, "training.grad_accum_steps": 1, "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 3, "eval.at_start": False}


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    overrides = tiny_overrides(tmp_path, **FAST)
    run_dir = Path(overrides["output_dir"])
    command = [sys.executable, str(REPO / "train.py"), "recipe=tiny_lora8", *as_cli(overrides)]
    process, half_written = start_until_checkpoint_write(command, run_dir, ENV)
    kill_9(process)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002"]

    resumed = subprocess.run([*command, "checkpoint.resume=true"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_session"] == 2
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    assert not half_written.exists()
    # the killed run logged steps 3-4 before dying; the resumed run's log has each step once
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_adapters(tmp_path):
    overrides = tiny_overrides(tmp_path, **{**FAST, "checkpoint.every_steps": 0})
    accelerate = Path(sys.executable).with_name("accelerate")
    # accelerate 1.x starts several CPU processes only through torchrun (--multi_gpu); the Trainer
    # asks for cpu=True without CUDA, so they join one gloo group.
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(REPO / "train.py"), "recipe=tiny_lora8", *as_cli(overrides)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((Path(overrides["output_dir"]) / "summary.json").read_text())
    digests = summary["adapter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # two ranks each read micro_batch_size x seq_len tokens per step
    assert summary["tokens"] == 4 * 2 * 4 * 32
