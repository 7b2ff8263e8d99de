"""GPT-2-style models hold their projections in transformers' Conv1D (weight stored [in, out]).
Quantized to Int8Linear ([out, in]) for training, the merged export must store them as Conv1D
again, so that the folder loads with from_pretrained and computes what the adapted model did."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from bytetune.quant_layers import dequantize_model, quantize_model
from bytetune.trainer.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61  # odd sizes: a transposed [in, out] weight cannot pass for [out, in] by accident


def tiny_gpt2_with_adapters():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=40, n_layer=2, n_head=4, n_positions=32))
    assert isinstance(base.transformer.h[0].attn.c_attn, Conv1D)
    quantize_model(base)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))


def test_dequantized_gpt2_layers_are_conv1d_again():
    model = tiny_gpt2_with_adapters().get_base_model()
    dequantize_model(model)
    layer = model.transformer.h[1].mlp.c_fc.base_layer
    assert isinstance(layer, Conv1D) and layer.weight.shape == (40, 160)  # [in, out]


def test_merged_gpt2_export_reloads_and_matches_the_adapted_model(tmp_path, monkeypatch):
    model = tiny_gpt2_with_adapters()
    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(0, VOCAB, (16,), generator=generator)} for _ in range(12)]
    probe = torch.randint(0, VOCAB, (3, 13), generator=generator)
    config = {"output_dir": str(tmp_path / "run"), "training": {"max_steps": 3, "micro_batch_size": 4},
              "logging": {"progress_bar": False, "plot": False, "tensorboard": False},
              "optimizer": {"name": "adamw", "lr": 3e-2}, "schedule": {"warmup_steps": 0},
              "export": {"merged": True, "merged_dtype": "float32"}}
    seen = {}
    export = Trainer._export_merged

    def record_then_export(self):
        # the trained model just before the export merges it in place
        adapted = self.unwrapped.eval()
        with torch.no_grad():
            seen["adapted"] = adapted(probe).logits
            float_base = copy.deepcopy(adapted)
            dequantize_model(float_base)  # the same adapters over the dequantized base: the oracle
            seen["oracle"] = float_base(probe).logits
            seen["lora_B"] = max(p.abs().max().item() for n, p in adapted.named_parameters() if "lora_B" in n)
        return export(self)

    monkeypatch.setattr(Trainer, "_export_merged", record_then_export)
    summary = Trainer(model, None, rows, config).train()
    assert seen["lora_B"] > 0  # the adapters trained: the merge adds a real delta

    merged = AutoModelForCausalLM.from_pretrained(summary["merged_dir"]).eval()
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    with torch.no_grad():
        logits = merged(probe).logits
    scale = seen["oracle"].abs().max().item()
    # float32 merge of the same weights: equal up to float32 rounding of the sums
    assert (logits - seen["oracle"]).abs().max().item() <= 1e-5 * max(scale, 1.0)
    # the int8 model differs by its activation quantization only
    assert (logits - seen["adapted"]).abs().max().item() <= 0.05 * scale
