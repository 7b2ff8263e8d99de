"""Mixture-of-experts through the real trainer: a tiny Mixtral and a tiny Qwen3-MoE from bundled
configs, experts in int8, LoRA on the experts and the attention, 3 steps; the adapter reloads in
plain PEFT on the float model and merges there."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from bytetune.quant_layers import dequantize_model, quantize_model
from bytetune.quant_layers.experts_lora import LoraInt8Experts
from bytetune.quant_layers.int8_experts import Int8Experts, router_names
from bytetune.recipe import RecipeError, load_recipe
from bytetune.loaders.models import load_base_model
from bytetune.trainer.trainer import Trainer

from .helpers import tiny_overrides

EXPERT_TARGETS = ["gate_up_proj", "down_proj"]


def _overrides(tmp_path, config_file):
    return tiny_overrides(
        tmp_path,
        **{
            "model.config_file": config_file,
            "lora.target_parameters": EXPERT_TARGETS,
            "lora.dropout": 0.0,
            "training.max_steps": 3,
            "schedule.warmup_steps": 1,
            "checkpoint.every_steps": 0,
            "eval.max_batches": 1,
            "data.max_train_chars": 6000,
        },
    )


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("config_file", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_moe_lora_trains_reloads_in_plain_peft_and_merges(tmp_path, config_file):
    overrides = _overrides(tmp_path, config_file)
    trainer = Trainer.from_recipe("tiny_lora8", **overrides)
    peft_model = trainer.unwrapped
    base = peft_model.get_base_model()
    experts = [m for m in base.modules() if isinstance(m, Int8Experts)]
    assert len(experts) == base.config.num_hidden_layers
    for module in experts:  # the expert weights are int8 codes, 1 byte each, and frozen
        for name in EXPERT_TARGETS:
            codes = getattr(module, name)
            assert codes.dtype == torch.int8 and not codes.requires_grad
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".experts." in n and "lora_A" in n for n in trainable)
    assert any("self_attn.q_proj.lora_A" in n for n in trainable)
    routers = router_names(base)
    assert routers and not any(n.startswith(f"base_model.model.{r}.") for r in routers for n in trainable)
    wrappers = [m for m in peft_model.modules() if isinstance(m, LoraInt8Experts)]
    assert len(wrappers) == 2 * len(experts)

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    summary = trainer.train()
    assert summary["steps"] == 3 and summary["nonfinite_steps"] == 0
    moved = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".experts." in n for n in moved) and any("self_attn" in n for n in moved)

    # The float model the int8 one was made from: same config, same seed (random init).
    cfg = load_recipe("tiny_lora8", overrides)
    float_model, _ = load_base_model(cfg)
    float_model.eval()
    ids = torch.randint(4, 260, (2, 17), generator=torch.Generator().manual_seed(0))
    peft_model.eval()
    with torch.no_grad():
        int8_logits = peft_model(ids).logits

    # Plain PEFT (no bytetune registration) on the float weights, and on the int8 weights
    # dequantized: the only difference left there is LLM.int8()'s activation rounding.
    plain = PeftModel.from_pretrained(copy.deepcopy(float_model), summary["adapter_dir"]).eval()
    assert not any(isinstance(m, LoraInt8Experts) for m in plain.modules())
    dequantized = load_base_model(cfg)[0]
    quantize_model(dequantized)
    dequantized = dequantize_model(dequantized).eval()
    plain_dq = PeftModel.from_pretrained(dequantized, summary["adapter_dir"]).eval()
    with torch.no_grad():
        plain_logits = plain(ids).logits
        dq_logits = plain_dq(ids).logits
        # LoRA changed the model (B left zero would make every comparison below vacuous)
        base_logits = float_model(ids).logits
    assert _rel(plain_logits, base_logits) > 1e-4
    assert _rel(int8_logits, dq_logits) < 0.02
    assert _rel(int8_logits, plain_logits) < 0.05
    merged = plain.merge_and_unload()
    with torch.no_grad():
        merged_logits = merged(ids).logits
    assert _rel(merged_logits, plain_logits) < 1e-5


def test_dropout_on_expert_parameters_is_one_line_before_loading():
    with pytest.raises(RecipeError, match=r"lora.dropout=0.05 .*set lora.dropout=0"):
        load_recipe("tiny_lora8", {"model.config_file": "tiny-mixtral", "lora.dropout": 0.05,
                                   "lora.target_parameters": EXPERT_TARGETS})  # fmt: skip


def test_dropout_on_expert_parameters_through_the_cli(tmp_path):
    import subprocess
    import sys

    from .helpers import REPO

    result = subprocess.run(
        [sys.executable, "train.py", "recipe=tiny_lora8", "model.config_file=tiny-mixtral",
         "lora.target_parameters=[gate_up_proj,down_proj]", f"output_dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "lora.dropout=0.1" in errors[0] and "set lora.dropout=0" in errors[0]
    assert not (tmp_path / "run").exists()
