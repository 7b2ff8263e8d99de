"""The planner, FSDP, LKD and the pipeline agree on what a model's decoder blocks are (one rule:
bytetune.quant_layers.blocks), on every kind of tiny model the tests train."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import AutoConfig, GPT2Config

from bytetune.plan.meta_model import block_list, build_meta_model
from bytetune.quant_layers.blocks import NoDecoderBlocks, decoder_block_list
from bytetune.quant_layers.lkd import decoder_layers
from bytetune.recipe import RecipeError, bundled_model_config
from bytetune.trainer import distributed, pipeline


def bundled(name: str, layers: int | None = None):
    config = bundled_model_config(name)
    config.pop("architectures", None)
    model_type = config.pop("model_type")
    if layers is not None:
        config["num_hidden_layers" if "num_hidden_layers" in config else "n_layer"] = layers
    return AutoConfig.for_model(model_type, **config)


MODELS = {
    "tiny-bloom": lambda: bundled("tiny-bloom"),
    "llama (smollm2, 3 layers)": lambda: bundled("smollm2-135m", layers=3),
    "smollm2-135m": lambda: bundled("smollm2-135m"),
    "gpt2": lambda: GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32),
    "tiny-mixtral": lambda: bundled("tiny-mixtral"),
    "tiny-qwen3-moe": lambda: bundled("tiny-qwen3-moe"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_four_callers_find_the_same_blocks(name):
    config = MODELS[name]()
    model = build_meta_model(config, "float32")  # no storage: a 30-layer model costs nothing
    planner = [module for _, module in block_list(model)]
    fsdp = distributed.decoder_blocks(model)
    lkd = list(decoder_layers(model))
    backbone = getattr(model, model.base_model_prefix)
    stages = list(pipeline._blocks_list(backbone)[1])
    assert [id(m) for m in planner] == [id(m) for m in fsdp] == [id(m) for m in lkd] == [id(m) for m in stages]
    # and they are the blocks: as many as the config says, each of the class transformers keeps whole
    assert len(planner) == config.num_hidden_layers
    assert {type(m).__name__ for m in planner} <= set(model._no_split_modules)
    # the planner's names are the model's own module names
    assert [n for n, _ in block_list(model)] == [n for n, m in model.named_modules() if any(m is b for b in planner)]


class Block(nn.Module):
    def __init__(self, experts: int):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(experts))


class HandBuilt(nn.Module):
    """No _no_split_modules; each of its 2 blocks holds a longer list (5 experts)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.stack = nn.ModuleList(Block(experts=5) for _ in range(2))


def test_without_no_split_modules_the_outermost_uniform_list_is_the_stack():
    model = HandBuilt()
    name, blocks = decoder_block_list(model)
    assert name == "stack" and blocks is model.stack  # not a block's (longer) list of experts
    assert distributed.decoder_blocks(model) == list(model.stack)
    assert decoder_layers(model) is model.stack


def test_no_stack_is_one_error_per_caller():
    flat = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(NoDecoderBlocks, match="decoder layers"):
        decoder_block_list(flat)
    with pytest.raises(ValueError, match="decoder layers"):
        block_list(flat)
    with pytest.raises(RecipeError, match="FSDP needs one fully_shard group per block"):
        distributed.decoder_blocks(flat)
    with pytest.raises(RecipeError, match="the pipeline cannot split it"):
        pipeline._blocks_list(flat)
