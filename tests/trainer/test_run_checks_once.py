"""The checks a training run makes before its model loads run once per run, not once in
from_config and again in the trainer: finding (and verifying) the checkpoint to resume, and what
FSDP cannot do."""

from __future__ import annotations

import pytest

from bytetune.trainer import checkpoint as ckpt
from bytetune.trainer import distributed
from bytetune.trainer import trainer as trainer_module
from bytetune.trainer.trainer import Trainer

from .helpers import tiny_overrides

SMALL = {"training.seq_len": 16, "training.micro_batch_size": 2, "data.max_train_chars": 4000, "data.eval": None,
         "schedule.warmup_steps": 0, "logging.tensorboard": False}


def counting(monkeypatch, module, name: str) -> list:
    calls: list = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_resumed_run_finds_its_checkpoint_once(tmp_path, monkeypatch):
    first = Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **SMALL, **{
        "training.max_steps": 2, "checkpoint.every_steps": 1}))
    first.train()
    calls = counting(monkeypatch, ckpt, "resolve_resume")
    loads = counting(monkeypatch, Trainer, "load_checkpoint")
    resumed = Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **SMALL, **{
        "training.max_steps": 3, "checkpoint.every_steps": 1, "checkpoint.resume": "previous_intact"}))
    summary = resumed.train()
    assert len(calls) == 1, calls
    assert summary["steps"] == 3 and [path.name for _, path in loads] == ["step-00000002"]  # it resumed from step 2
    # a second train() of the same trainer looks again: the checkpoints it wrote count now
    resumed.train()
    assert len(calls) == 2


class _StopBeforeSharding(Exception):
    pass


def test_fsdp_recipe_is_checked_once(tmp_path, monkeypatch):
    calls = counting(monkeypatch, distributed, "check_fsdp_recipe")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: the FSDP path is taken

    def stop(*args, **kwargs):  # past the trainer's own FSDP branch, before any process group
        raise _StopBeforeSharding

    monkeypatch.setattr(trainer_module, "_accelerator", stop)
    with pytest.raises(_StopBeforeSharding):
        Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **SMALL, **{
            "training.max_steps": 1, "parallel.strategy": "fsdp"}))
    assert len(calls) == 1, calls
