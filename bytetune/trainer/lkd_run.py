"""Running LKD from the command line: load a model, build calibration batches, calibrate, save.

``python -m bytetune.lkd recipe=NAME key=value ...``; the algorithm is bytetune.quant_layers.lkd.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from bytetune.quant_layers.lkd import LayerReport, LKDConfig, decoder_layers, run_lkd, save_quantized
from bytetune.recipe import recipe_path
from bytetune.recipe.schema import ModelConfig
from bytetune.trainer.local_text import stdlib_text
from bytetune.trainer.models import SMOLLM2_GGUF, load_gguf_cached, smollm2_gguf_path


def calibration_batches(
    tokenizer=None,
    n_batches: int = 2,
    batch_size: int = 4,
    seq_len: int = 128,
    source: str = "text",
    vocab_size: int | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Token batches [batch_size, seq_len]: ``source="text"`` tokenizes the standard library's
    training split; ``"random"`` draws uniform token ids below ``vocab_size``."""
    generator = torch.Generator().manual_seed(seed)
    needed = n_batches * batch_size * seq_len
    if source == "random":
        if vocab_size is None:
            raise ValueError("random calibration tokens need vocab_size")
        ids = torch.randint(0, vocab_size, (needed,), generator=generator)
    elif source == "text":
        if tokenizer is None:
            raise ValueError("text calibration needs a tokenizer")
        text = stdlib_text("train", max_chars=needed * 6)
        ids = torch.tensor(tokenizer(text)["input_ids"][:needed])
        if ids.numel() < needed:
            raise ValueError(f"the calibration text gave {ids.numel()} tokens, {needed} are needed")
    else:
        raise ValueError(f"source must be 'text' or 'random', got {source!r}")
    return list(ids.reshape(n_batches, batch_size, seq_len))


@dataclass
class LKDRun:
    """Everything ``python -m bytetune.lkd`` reads (a recipe's ``lkd:`` section + overrides)."""

    model: str = "smollm2"  # "smollm2" (offline default) or a transformers path / hub name
    output_dir: str = "runs/lkd"
    data: str = "text"  # "text" (stdlib training split) or "random"
    n_batches: int = 2
    batch_size: int = 2
    seq_len: int = 128
    seed: int = 0
    lkd: LKDConfig = field(default_factory=LKDConfig)


def load_smollm2_cached():
    """SmolLM2-135M in float32 through the trainer's GGUF conversion cache (seconds, not a minute)."""
    path = smollm2_gguf_path()
    return load_gguf_cached(path.parent, path.name, torch.float32, ModelConfig.cache_dir)


def load_model_and_tokenizer(name: str, need_tokenizer: bool = True):
    """(float32 model, tokenizer or None): "smollm2" is the offline default model."""
    if name == "smollm2":
        return load_smollm2_cached()
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model, (AutoTokenizer.from_pretrained(name) if need_tokenizer else None)


def lkd_quantize(run: LKDRun, log: Callable[[str], None] = print) -> tuple[nn.Module, list[LayerReport]]:
    """Load ``run.model``, calibrate it with LKD, save it to ``run.output_dir``."""
    torch.manual_seed(run.seed)
    model, tokenizer = load_model_and_tokenizer(run.model, need_tokenizer=run.data == "text")
    model.eval()
    batches = calibration_batches(
        tokenizer, run.n_batches, run.batch_size, run.seq_len, run.data, model.config.vocab_size, run.seed
    )
    log(f"lkd: {len(decoder_layers(model))} layers, {len(batches)} x {tuple(batches[0].shape)} {run.data} tokens")
    reports = run_lkd(model, batches, run.lkd, log=log)
    meta = {"model": run.model, "lkd": asdict(run.lkd), "reports": [asdict(r) for r in reports]}
    out = save_quantized(model, run.output_dir, meta)
    log(f"lkd: saved to {out}")
    return model, reports


def _run_from_training_recipe(recipe) -> dict:
    """What LKD needs from a fine-tuning recipe: its model and its quantization section."""
    model = recipe.get("model") or {}
    quant = recipe.get("quantization") or {}
    name = "smollm2" if model.get("gguf_file") == SMOLLM2_GGUF else model.get("name_or_path", "smollm2")
    lkd: dict = {key: quant[key] for key in ("group_size", "act_bits") if key in quant}
    if quant.get("module_bits"):
        lkd["module_bits"] = dict(quant["module_bits"])
    if quant.get("skip_modules"):
        lkd["skip"] = list(quant["skip_modules"])
    return {"model": name, "output_dir": f"runs/lkd/{recipe.get('name', 'recipe')}", "lkd": lkd}


def parse_cli(argv: list[str]) -> LKDRun:
    """``recipe=NAME_OR_PATH`` (recipes/NAME.yaml: its ``lkd_run:`` section if it has one, else
    the model and quantization sections of a fine-tuning recipe) then ``key=value`` overrides
    (``lkd.steps=20``)."""
    schema = OmegaConf.structured(LKDRun)
    recipe = [a.split("=", 1)[1] for a in argv if a.startswith("recipe=")]
    overrides = [a for a in argv if not a.startswith("recipe=")]
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise SystemExit(f"arguments must be key=value, got {bad}")
    merged = schema
    if recipe:
        path = recipe_path(recipe[-1])
        loaded = OmegaConf.to_container(OmegaConf.load(path))
        section = loaded["lkd_run"] if "lkd_run" in loaded else _run_from_training_recipe(loaded)
        merged = OmegaConf.merge(merged, section)
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged)


def main(argv: list[str] | None = None) -> None:
    run = parse_cli(sys.argv[1:] if argv is None else argv)
    lkd_quantize(run)


if __name__ == "__main__":
    main()
