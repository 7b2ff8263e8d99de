"""Every shipped recipe runs offline in a shrunken form: same architecture from its bundled
config.json, two narrow layers, random weights, a few steps. No recipe can rot unseen."""

from __future__ import annotations

import json

import pytest

from bytetune.recipe import MODEL_CONFIGS_DIR, available_recipes, load_recipe
from bytetune.trainer.trainer import Trainer

from .helpers import tiny_overrides

SHRINK = {
    "model.from_config": True,
    "model.shrink.num_layers": 2,
    "model.shrink.hidden_size": 64,
    "model.shrink.num_heads": 4,
    "model.shrink.vocab_size": 512,  # the bytes tokenizer needs 260; BLOOM's 250880 only costs time
    "model.tokenizer": "bytes",
    "model.device_map": None,
    "data.max_train_chars": 4000,
    "data.max_eval_chars": 1000,
    "training.max_steps": 2,
    "schedule.warmup_steps": 0,  # the recipes warm up longer than 2 steps
    "training.micro_batch_size": 2,
    "training.grad_accum_steps": 1,
    "training.seq_len": 32,
    "eval.batch_size": 4,
    "eval.max_batches": 1,
    "checkpoint.every_steps": 0,
}


def one_process_recipes() -> list[str]:
    """The recipes one process trains; a pipeline recipe (parallel.strategy=pipeline) runs shrunk
    through a real 2-process pipeline in tests/trainer/test_pipeline.py instead."""
    return [name for name in available_recipes() if load_recipe(name).parallel.strategy != "pipeline"]


@pytest.mark.parametrize("recipe", one_process_recipes())
def test_recipe_runs_shrunk(tmp_path, recipe):
    cfg = load_recipe(recipe)
    assert cfg.model.config_file, f"{recipe} names no bundled config (model.config_file)"
    trainer = Trainer.from_recipe(recipe, **tiny_overrides(tmp_path, **SHRINK))
    config = trainer.unwrapped.get_base_model().config
    bundled = json.loads((MODEL_CONFIGS_DIR / f"{cfg.model.config_file}.json").read_text())
    assert config.model_type == bundled["model_type"] and type(config).__name__ == bundled["architectures"][0].replace("ForCausalLM", "Config")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 512)
    summary = trainer.train()
    assert summary["steps"] == 2 and summary["final_eval_loss"] is not None


def test_bundled_configs_match_the_published_models():
    def load(name):
        return json.loads((MODEL_CONFIGS_DIR / f"{name}.json").read_text())

    bloom, bloom7b, smol = load("bloom"), load("bloom-7b1"), load("smollm2-135m")
    assert (bloom["hidden_size"], bloom["n_layer"], bloom["n_head"], bloom["vocab_size"]) == (14336, 70, 112, 250880)
    assert (bloom7b["hidden_size"], bloom7b["n_layer"], bloom7b["n_head"], bloom7b["vocab_size"]) == (4096, 30, 32, 250880)
    assert (smol["hidden_size"], smol["intermediate_size"], smol["num_hidden_layers"], smol["num_attention_heads"],
            smol["num_key_value_heads"], smol["vocab_size"], smol["tie_word_embeddings"],
            smol["rope_parameters"]["rope_theta"], smol["rms_norm_eps"]) == (576, 1536, 30, 9, 3, 49152, True, 100000.0, 1e-5)
