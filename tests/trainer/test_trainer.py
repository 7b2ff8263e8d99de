"""The training loop on the tiny recipe: resume equivalence, schedules, non-finite steps, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from bytetune.trainer.checkpoint import CheckpointError, list_checkpoints
from bytetune.recipe.schema import RecipeError, ScheduleConfig
from bytetune.trainer.trainer import Trainer, TrainingError, build_scheduler

from .helpers import tiny_overrides

# 4 micro-batches of 4 x 32 tokens per step keeps each step well under a second on 2 cores.
SMALL = {"training.max_steps": 6, "training.grad_accum_steps": 2, "checkpoint.every_steps": 3}


def adapter_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


def test_resume_is_indistinguishable_from_straight_run(tmp_path):
    straight = Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path / "a", **SMALL))
    straight.train()

    interrupted = Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path / "b", **SMALL))
    assert interrupted.train(stop_after_step=3)["stopped_early"]
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run")] == ["step-00000003"]
    resumed = Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path / "b", **SMALL, **{"checkpoint.resume": "true"}))
    summary = resumed.train()

    losses_a = [h["loss"] for h in straight.history]
    losses_b = [h["loss"] for h in resumed.history]
    assert len(losses_a) == len(losses_b) == 6
    assert max(abs(a - b) for a, b in zip(losses_a, losses_b)) <= 1e-6
    weights_a, weights_b = adapter_weights(straight), adapter_weights(resumed)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    # the adapters moved away from their initial values, and the run wrote its end products
    assert summary["steps"] == 6 and summary["steps_this_session"] == 3
    run = tmp_path / "b" / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["final_eval_loss"] == summary["final_eval_loss"]
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"loss", "tokens_per_s"} <= set(logged[-2]) or {"loss", "tokens_per_s"} <= set(logged[-1])


def test_training_lowers_loss_and_checkpoints_rotate(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"training.max_steps": 10, "training.grad_accum_steps": 1,
                                            "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
                                            "optimizer.lr": 3e-3, "lora.dropout": 0.0, "logging.plot": True,
                                            "export.merged": True, "export.merged_dtype": "float32"})
    trainer = Trainer.from_recipe("tiny_lora8", **overrides)
    batch = trainer.eval_data.batch(torch.arange(4))
    summary = trainer.train()
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert math.isclose(summary["final_eval_ppl"], math.exp(summary["final_eval_loss"]), rel_tol=1e-9)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000008", "step-00000010"]
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    # the merged export is a plain transformers model that scores about as well as the adapters did
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(summary["merged_dir"])
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        merged_loss = merged(**batch).loss.item()
    assert abs(merged_loss - summary["final_eval_loss"]) < 0.05 * summary["final_eval_loss"]


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_decays(name):
    sched = OmegaConf.structured(ScheduleConfig(name=name, warmup_steps=4, min_lr_ratio=0.1))
    param = torch.nn.Parameter(torch.zeros(1))
    scheduler = build_scheduler(torch.optim.SGD([param], lr=1.0), 20, sched)
    factors = []
    for _ in range(21):
        factors.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    assert factors[1] < factors[2] < factors[3] < factors[4] == pytest.approx(1.0)
    if name == "constant":
        assert factors[20] == pytest.approx(1.0)
    else:
        assert factors[20] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
        assert factors[12] == pytest.approx(0.1 + 0.9 * 0.5)


def test_nonfinite_loss_skips_the_step_then_stops(tmp_path):
    # no warmup: transformers' warmup gives the first step a learning rate of 0
    overrides = tiny_overrides(tmp_path, **{"training.max_steps": 6, "training.grad_accum_steps": 1,
                                            "training.max_nonfinite_steps": 1, "eval.at_start": False,
                                            "schedule.warmup_steps": 0})
    trainer = Trainer.from_recipe("tiny_lora8", **overrides)
    base = trainer.unwrapped.get_base_model()
    calls = {"n": 0}

    def poison_second_and_later(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 2 else output

    # The final norm's output feeds the loss on both paths (the fused one never runs the head on
    # every position, so a hook on the head would not reach it).
    base.transformer.ln_f.register_forward_hook(poison_second_and_later)
    before = adapter_weights(trainer)
    with pytest.warns(UserWarning, match="non-finite loss"):
        with pytest.raises(TrainingError, match="max_nonfinite_steps=1"):
            trainer.train()
    # step 1 updated the adapters, step 2 was skipped, step 3 was the second skip and stopped the run
    assert trainer.nonfinite_steps == 2 and trainer.step == 2
    after = adapter_weights(trainer)
    assert all(torch.isfinite(w).all() for w in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_errors_that_need_a_run(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **{"checkpoint.resume": "true"}))
    with pytest.raises(RecipeError, match="model.name_or_path='./no/such/model' does not exist"):
        Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **{"model.from_config": False,
                                                                        "model.name_or_path": "./no/such/model"}))
    with pytest.raises(RecipeError, match="data.eval file .* does not exist"):
        Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **{"data.eval": str(tmp_path / "gone.jsonl")}))
    # a checkpoint of another run: same recipe with a wider LoRA, refused before the model loads
    small = {"training.max_steps": 1, "schedule.warmup_steps": 0, "training.grad_accum_steps": 1, "eval.at_start": False}
    Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **small)).train()
    with pytest.raises(CheckpointError, match=r"belongs to another run: its recipe differs in lora.r \(4 there, 8 here\)"):
        Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **small, **{"lora.r": 8, "checkpoint.resume": "latest"}))


def test_trainer_on_a_model_built_by_hand(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    base = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["query_key_value"], task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, 64, (16,), generator=generator)} for _ in range(12)]
    config = {"output_dir": str(tmp_path / "run"), "training": {"max_steps": 3, "micro_batch_size": 4},
              "logging": {"progress_bar": False, "plot": False}, "optimizer": {"name": "adamw", "lr": 1e-2}}
    trainer = Trainer(model, None, rows, config, eval_data=rows[:4])
    before = trainer.evaluate()["eval_loss"]
    summary = trainer.train()
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 4 * 16
    assert summary["final_eval_loss"] < before
    assert (trainer.save_adapter(tmp_path / "mine") / "adapter_model.safetensors").is_file()


def test_lora_layers_limits_adapters_to_chosen_blocks(tmp_path):
    trainer = Trainer.from_recipe("tiny_lora8", **tiny_overrides(tmp_path, **{"lora.layers": [1]}))
    names = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad]
    assert names and all(".h.1." in n for n in names)


def test_resume_refuses_a_checkpoint_of_another_model_built_by_hand(tmp_path):
    """The same config over another hand-built model: the recipe hash matches, the model
    fingerprint (adapter names and shapes) does not."""
    from peft import LoraConfig, get_peft_model
    from transformers import BloomConfig, BloomForCausalLM

    def model(rank: int):
        torch.manual_seed(0)
        base = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
        return get_peft_model(base, LoraConfig(r=rank, target_modules=["query_key_value"], task_type="CAUSAL_LM"))

    rows = [{"input_ids": torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))} for i in range(8)]
    config = {"output_dir": str(tmp_path / "run"), "training": {"max_steps": 2, "micro_batch_size": 4},
              "logging": {"progress_bar": False, "plot": False}, "optimizer": {"name": "adamw", "lr": 1e-2}}
    Trainer(model(2), None, rows, config, memory_plan=None).train()
    config["checkpoint"] = {"resume": "latest"}
    other = Trainer(model(4), None, rows, config, memory_plan=None)
    with pytest.raises(CheckpointError, match="from a different model"):
        other.train()


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    # Checkpoints at steps 2, 4, 6; resuming from step 2 and ending at step 3 sets 4 and 6 aside,
    # so "latest" never mixes the abandoned continuation with this one.
    overrides = tiny_overrides(tmp_path, **{**SMALL, "checkpoint.keep_last": 3, "checkpoint.every_steps": 2})
    Trainer.from_recipe("tiny_lora8", **overrides).train()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004", "step-00000006"]
    older = list_checkpoints(run)[0]
    resumed = Trainer.from_recipe("tiny_lora8", **{**overrides, "checkpoint.resume": str(older),
                                                   "training.max_steps": 3})
    with pytest.warns(UserWarning, match="superseded"):
        resumed.train()
    # the resumed-from checkpoint and the new one stay (keep_last counts only this continuation)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in run.glob("checkpoints/superseded-*")) == [
        "superseded-step-00000004", "superseded-step-00000006"]
