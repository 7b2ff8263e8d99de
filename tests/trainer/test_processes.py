"""Runs as separate processes: kill -9 during a checkpoint write, and DDP over gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bytetune.trainer.checkpoint import WRITE_DELAY_ENV, list_checkpoints

from .helpers import REPO, as_cli, tiny_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
FAST = {"training.max_steps": 4, "training.grad_accum_steps": 1, "checkpoint.every_steps": 2,
        "checkpoint.keep_last": 3, "eval.at_start": False}


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    overrides = tiny_overrides(tmp_path, **FAST)
    run_dir = Path(overrides["output_dir"])
    command = [sys.executable, str(REPO / "train.py"), "recipe=tiny_lora8", *as_cli(overrides)]
    process = subprocess.Popen(command, cwd=REPO, env={**ENV, WRITE_DELAY_ENV: "4:120"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    half_written = run_dir / "checkpoints" / ".tmp-step-00000004"
    deadline = time.monotonic() + 240
    try:
        while not (half_written / "adapter_model.safetensors").is_file():
            assert process.poll() is None, "training ended before the step-4 checkpoint write"
            assert time.monotonic() < deadline, "step-4 checkpoint write never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002"]

    resumed = subprocess.run([*command, "checkpoint.resume=true"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_session"] == 2
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    assert not half_written.exists()


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_adapters(tmp_path):
    overrides = tiny_overrides(tmp_path, **{**FAST, "checkpoint.every_steps": 0})
    accelerate = Path(sys.executable).with_name("accelerate")
    # accelerate 1.x starts several CPU processes only through torchrun (--multi_gpu); the Trainer
    # asks for cpu=True without CUDA, so they join one gloo group.
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
               str(REPO / "train.py"), "recipe=tiny_lora8", *as_cli(overrides)]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((Path(overrides["output_dir"]) / "summary.json").read_text())
    digests = summary["adapter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # two ranks each read micro_batch_size x seq_len tokens per step
    assert summary["tokens"] == 4 * 2 * 4 * 32
