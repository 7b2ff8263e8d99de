"""Recipe loading: every shipped recipe resolves; every bad input fails with one clear line."""

from __future__ import annotations

import json
import sys

import pytest

from bytetune.recipe.schema import RecipeError, available_recipes, load_recipe, parse_overrides

from bytetune.cli import train_main

SHIPPED = ("smollm2_lora8", "bloom_lora8", "bloom7b_lora8", "tiny_lora8")


def test_shipped_recipes_resolve():
    assert set(SHIPPED) <= set(available_recipes())
    for name in SHIPPED:
        cfg = load_recipe(name)
        assert cfg.name == name and cfg.output_dir == f"runs/{name}"
    bloom = load_recipe("bloom_lora8")
    assert (bloom.model.device_map, bloom.training.precision, bloom.optimizer.name) == ("auto", "bf16", "adamw8bit")
    assert bloom.training.gradient_checkpointing and bloom.quantization.int8


def test_overrides_are_typed_and_applied():
    cfg = load_recipe("tiny_lora8", ["training.seq_len=48", "optimizer.betas=[0.8,0.95]", "model.shrink.num_layers=1"])
    assert cfg.training.seq_len == 48 and list(cfg.optimizer.betas) == [0.8, 0.95]
    assert cfg.model.shrink.num_layers == 1
    cfg = load_recipe("tiny_lora8", {"training.max_steps": 3, "lora": {"r": 2}})
    assert cfg.training.max_steps == 3 and cfg.lora.r == 2 and cfg.lora.alpha == 8


def test_recipe_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel:\n  name_or_path: some-org/some-model\ntraining:\n  seq_len: 16\n")
    cfg = load_recipe(str(path))
    assert cfg.training.seq_len == 16 and cfg.output_dir == "runs/mine"


def _one_line_error(capsys, argv) -> str:
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("error: ")
    return err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["recipe=no_such_recipe"], ["unknown recipe 'no_such_recipe'", "tiny_lora8"]),
        (["recipe=tiny_lora8", "training.sequence_length=3"], ["unknown key 'training.sequence_length'", "seq_len"]),
        (["recipe=tiny_lora8", "training.seq_len=long"], ["wrong type for 'training.seq_len'", "int"]),
        (["recipe=tiny_lora8", "training.seq_len=0"], ["training.seq_len must be > 0"]),
        (["recipe=tiny_lora8", "training.micro_batch_size=-1"], ["training.micro_batch_size must be > 0"]),
        (["recipe=tiny_lora8", "optimizer.name=adagrad"], ["optimizer.name='adagrad'", "adamw8bit"]),
        (["recipe=tiny_lora8", "justaword"], ["is not key=value"]),
    ],
)
def test_bad_input_fails_with_one_line(capsys, argv, words):
    err = _one_line_error(capsys, argv)
    for word in words:
        assert word in err, err


def test_bad_yaml_fails_with_one_line(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ntraining:\n  seq_len: [1, 2\n")
    assert "bad YAML" in _one_line_error(capsys, [f"recipe={path}"])
    path.write_text("name: x\ntraining:\n  seq_len: 1.5\n")
    assert "wrong type for 'training.seq_len'" in _one_line_error(capsys, [f"recipe={path}"])


def test_print_config_prints_resolved_recipe(capsys):
    assert train_main(["recipe=tiny_lora8", "training.seq_len=40", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "seq_len: 40" in out and "output_dir: runs/tiny_lora8" in out


def test_parse_overrides_splits_recipe():
    assert parse_overrides(["recipe=a", "x.y=1"]) == ("a", ["x.y=1"])
    with pytest.raises(RecipeError):
        parse_overrides(["--lr", "1"])


def test_saved_adapter_names_the_hub_id_as_its_base(tmp_path, capsys, recwarn):
    """adapter_config.json names model.hub_id (else model.name_or_path), never the path the base
    was loaded from, so AutoPeftModelForCausalLM.from_pretrained finds the base elsewhere; saving
    never asks the hub about that base."""
    run_dir = tmp_path / "run"
    argv = [
        "recipe=tiny_lora8", "model.hub_id=some-org/tiny-bloom", "training.max_steps=1", "schedule.warmup_steps=0",
        f"output_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}", "data.eval=null", "checkpoint.every_steps=0",
        "logging.progress_bar=false", "logging.plot=false", "logging.tensorboard=false",
    ]
    assert train_main(argv) == 0, capsys.readouterr().err
    for directory in [run_dir / "adapter", *sorted((run_dir / "checkpoints").glob("step-*"))]:
        adapter = json.loads((directory / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == "some-org/tiny-bloom", directory
    assert not [w for w in recwarn if "some-org/tiny-bloom" in str(w.message)]


def test_shipped_smollm2_recipes_name_the_hub_model():
    for name in ("smollm2_lora8", "smollm2_lora4"):
        assert load_recipe(name).model.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
