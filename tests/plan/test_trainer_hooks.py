"""The trainer uses the plan: a recipe that cannot fit fails before loading, runs record peaks."""

import pytest

from bytetune.plan.runtime import DoesNotFitError
from bytetune.trainer.trainer import Trainer


def test_recipe_that_cannot_fit_fails_before_loading(tmp_path, monkeypatch):
    # BLOOM-176B on this machine: the plan says no before any weight (or the hub) is touched.
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded for a plan that does not fit")

    monkeypatch.setattr("bytetune.trainer.trainer.build_model", no_loading)
    with pytest.raises(DoesNotFitError) as error:
        Trainer.from_recipe("bloom_lora8", output_dir=str(tmp_path / "run"), **{"training.seq_len": 512})
    message = str(error.value)
    assert "does not fit" in message and "bloom_lora8" in message
    assert "GiB" in message


def test_summary_records_measured_peak_beside_prediction(tmp_path):
    overrides = {"output_dir": str(tmp_path / "run"), "data.cache_dir": str(tmp_path / "cache"),
                 "logging.progress_bar": False, "logging.plot": False, "training.max_steps": 2,
                 "training.grad_accum_steps": 1, "eval.max_batches": 1}
    trainer = Trainer.from_recipe("tiny_lora8", **overrides)
    assert trainer.memory_plan is not None and trainer.memory_plan.fits
    summary = trainer.train()
    (row,) = summary["memory_per_device"]
    assert row["device"] == "cpu" and row["measured_kind"] == "process_peak_rss"
    assert row["measured_peak_bytes"] > 0 and row["predicted_total_bytes"] > row["predicted_allocated_bytes"] > 0
    # The whole process against the planner's total (tensors + the stated runtime figure).
    assert 0.3 < row["measured_over_predicted"] < 3
