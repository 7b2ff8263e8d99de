"""Completions before and after the fine-tune: the CLI, Trainer.generate, the run's summary."""

from __future__ import annotations

import pytest
import torch

from bytetune.cli import generate_main
from bytetune.trainer.trainer import Trainer

from .helpers import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = {"training.max_steps": 3, "training.grad_accum_steps": 1, "optimizer.lr": 3e-2, "lora.dropout": 0.0,
       "eval.at_start": False, "checkpoint.every_steps": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step tiny run: its trainer and summary."""
    tmp_path = tmp_path_factory.mktemp("gen")
    trainer = Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **RUN))
    return trainer, trainer.train(), tmp_path


def test_summary_ends_with_a_held_out_before_and_after(trained):
    trainer, summary, _ = trained
    sample = summary["held_out_sample"]
    assert sample["prompt"] and set(sample) == {"prompt", "before", "after"}
    # the "before" is the base alone, the "after" the adapted model
    assert trainer.generate(sample["prompt"], 24, adapter=False) == sample["before"]
    assert trainer.generate(sample["prompt"], 24) == sample["after"]


def test_disabling_the_adapter_is_what_before_means(trained):
    trainer, summary, _ = trained
    prompt = summary["held_out_sample"]["prompt"]
    base = trainer.generate(prompt, 12, adapter=False)
    generator = torch.Generator().manual_seed(0)
    saved = {}
    for name, param in trainer.unwrapped.named_parameters():
        if "lora_B" in name:  # a strong adapter: the greedy path must change
            saved[name] = param.detach().clone()
            param.data = torch.randn(param.shape, generator=generator) * 2.0
    try:
        assert trainer.generate(prompt, 12) != base
        assert trainer.generate(prompt, 12, adapter=False) == base
    finally:
        for name, param in trainer.unwrapped.named_parameters():
            if name in saved:
                param.data = saved[name]


def test_generate_cli_streams_base_and_adapter_completions(trained, capsys):
    trainer, summary, tmp_path = trained
    prompt = summary["held_out_sample"]["prompt"]
    argv = ["recipe=tiny_lora8", f"output_dir={tmp_path / 'run'}", f"prompt={prompt}", "max_new_tokens=24"]
    assert generate_main(argv) == 0
    out = capsys.readouterr().out
    assert "--- base model:" in out and "--- with the adapter:" in out
    assert summary["held_out_sample"]["after"].strip()[:10] in out


def test_generate_cli_errors_are_one_line(trained, tmp_path, capsys):
    _, _, run_dir = trained
    cases = [
        (["recipe=tiny_lora8", f"output_dir={tmp_path / 'nothing'}", "prompt=x"], "no adapter at"),
        (["recipe=tiny_lora8", f"adapter={tmp_path}", "prompt=x"], "has no adapter_config.json"),
        (["recipe=tiny_lora8", f"adapter={run_dir / 'run' / 'adapter'}", "prompt=x", "model.shrink.hidden_size=32",
          "model.shrink.num_heads=4"], "does not fit this base model"),
        (["recipe=tiny_lora8", "max_new_tokens=0", "prompt=x"], "max_new_tokens must be a positive integer"),
        (["recipe=tiny_lora8"], "prompt="),
    ]
    for argv, message in cases:
        assert generate_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], (argv, err)
