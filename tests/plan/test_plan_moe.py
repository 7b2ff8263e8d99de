"""The planner on the large-model recipes: experts counted (int8 codes + scales, LoRA on expert
parameters), and every bundled config's parameter count against a formula written from the
architecture (bytetune.plan.param_formula), not from the meta model."""

from __future__ import annotations

import pytest
import torch

from bytetune.plan.__main__ import main as plan_main
from bytetune.plan.counting import weight_costs
from bytetune.plan.meta_model import build_meta_model
from bytetune.plan.param_formula import params_from_config
from bytetune.plan.spec import model_config_from_recipe, spec_from_recipe
from bytetune.recipe import load_recipe

# Published sizes (model cards): total parameters, and active per token for the MoE models.
PUBLISHED = {
    "llama-3.1-70b": (70.6e9, None),
    "qwen2.5-72b": (72.7e9, None),
    "mixtral-8x22b": (141e9, 39e9),
    "falcon-180b": (180e9, None),
    "qwen3-235b-a22b": (235e9, 22e9),
}


@pytest.mark.parametrize("config_file", sorted(PUBLISHED) + ["tiny-mixtral", "tiny-qwen3-moe", "smollm2-135m"])
def test_formula_count_matches_the_meta_model(config_file):
    from bytetune.recipe import bundled_model_config
    from transformers import AutoConfig

    config = dict(bundled_model_config(config_file))
    total, active = params_from_config(config)
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    meta = build_meta_model(AutoConfig.for_model(model_type, **config), torch.bfloat16)
    assert sum(p.numel() for p in meta.parameters()) == total
    if config_file in PUBLISHED:
        published_total, published_active = PUBLISHED[config_file]
        assert abs(total - published_total) / published_total < 0.01
        if published_active:
            assert abs(active - published_active) / published_active < 0.03
        else:
            assert active == total


def test_planner_counts_int8_experts_and_their_lora():
    recipe = load_recipe("mixtral8x22b_lora8", {"model.shrink.num_layers": 2}, check_paths=False)
    spec = spec_from_recipe(recipe)
    model = build_meta_model(model_config_from_recipe(recipe), torch.bfloat16)
    costs = weight_costs(model, spec)
    block = costs["model.layers.0"]
    e, h, i, r = 8, 6144, 16384, 16
    codes = e * 2 * i * h + e * h * i
    scales = 4 * (e * 2 * i + e * h)
    attention_int8 = h * 48 * 128 + 2 * h * 8 * 128 + 48 * 128 * h
    assert block.quantized_weights == codes + scales + attention_int8 + 4 * (48 * 128 + 2 * 8 * 128 + h)
    # LoRA: attention (4 linears) + the two expert parameters (A [E r, K], B [N, r E])
    attention_lora = r * ((h + 48 * 128) * 2 + (h + 8 * 128) * 2)
    experts_lora = e * r * h + 2 * i * r * e + e * r * i + h * r * e
    assert block.lora_numel == attention_lora + experts_lora
    # the router stays float (bf16), with the norms
    assert block.other_weights == 2 * (e * h + 2 * h)


def test_plan_cli_mixtral_8x22b_on_8x24gib(capsys):
    status = plan_main(["recipe=mixtral8x22b_lora8", "gpus=8x24GiB"])
    out = capsys.readouterr().out
    assert "Per device (GiB):" in out and "cuda:7" in out and "Device map:" in out
    assert status == 0 and "fits on 8 device(s)" in out
