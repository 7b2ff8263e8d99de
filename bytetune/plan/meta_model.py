"""The model on the meta device: built from its transformers config without storage, and the parts
the planner counts (its repeated blocks, their linears)."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from bytetune.plan.spec import as_dtype
from bytetune.quant_layers.blocks import decoder_blocks


def build_meta_model(model_config, dtype: str | torch.dtype, num_layers: int | None = None) -> nn.Module:
    """The causal-LM for ``model_config`` on the meta device (no storage), weights tied as configured."""
    config = copy.deepcopy(model_config)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=as_dtype(dtype))
    model.tie_weights()
    return model


def block_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated decoder blocks with their names, by the rule FSDP, LKD and the pipeline use
    (bytetune.quant_layers.blocks); a ValueError when the model has none."""
    return decoder_blocks(model)


def target_linears(block: nn.Module, targets: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The linears of one block that get LoRA (and int8 when quantizing)."""
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    if targets == "all-linear":
        return linears
    wanted = {targets} if isinstance(targets, str) else set(targets)
    chosen = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in wanted]
    missing = wanted - {n.rsplit(".", 1)[-1] for n, _ in chosen}
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"LoRA targets {sorted(missing)} are not linears of the block; it has {names}")
    return chosen
