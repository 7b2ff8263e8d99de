"""ZeroQuant whole-model conversion, transformers quantize-on-load (ZeroQuantConfig), LoRA via PEFT."""

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

from bytetune import ZeroQuantConfig
from bytetune.quant_layers import dequantize_model
from bytetune.quant_layers.group_lora import LoraGroupQuantLinear, load_zeroquant_adapter, zeroquant_lora_config
from bytetune.quant_layers.group_linear import GroupQuantLinear
from bytetune.quant_layers.zeroquant import (
    bits_for,
    quantize_model_zeroquant,
    quantized_weight_bytes_per_param,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory):
    torch.manual_seed(1)
    config = BloomConfig(vocab_size=96, hidden_size=64, n_layer=2, n_head=4)
    path = tmp_path_factory.mktemp("bloom")
    BloomForCausalLM(config).save_pretrained(path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(7))


def test_bits_for_default_patterns():
    from bytetune.quant_layers.zeroquant import DEFAULT_MODULE_BITS

    assert bits_for("model.layers.3.self_attn.q_proj", DEFAULT_MODULE_BITS) == 8
    assert bits_for("transformer.h.0.self_attention.query_key_value", DEFAULT_MODULE_BITS) == 8
    assert bits_for("model.layers.3.mlp.down_proj", DEFAULT_MODULE_BITS) == 4
    assert bits_for("transformer.h.1.mlp.dense_h_to_4h", DEFAULT_MODULE_BITS) == 4
    assert bits_for("score", DEFAULT_MODULE_BITS, default_bits=8) == 8


def test_quantize_model_default_is_w48_and_keeps_head():
    model = tiny_llama()
    reference = _logits(model, IDS)
    report = quantize_model_zeroquant(model, group_size=32)
    assert report.n_quantized == 14 and report.bytes_after < report.bytes_before
    block = model.model.layers[0]
    assert block.self_attn.q_proj.bits == 8 and block.mlp.up_proj.bits == 4
    assert block.self_attn.q_proj.act_bits == 8
    assert type(model.lm_head) is nn.Linear
    quantized = _logits(model, IDS)
    rel = (quantized - reference).norm() / reference.norm()
    assert 0 < rel < 0.2
    per_param = quantized_weight_bytes_per_param(model)
    # 8 of 14 layers' weights... by count: attention 4*64*64-ish at 1 B, MLP 3*64*128 at 0.5 B, plus scales.
    attn = 2 * (64 * 64 * 2 + 64 * 32 * 2)
    mlp = 2 * 3 * 64 * 128
    scales = sum(m.weight_scale.numel() * 4 for m in model.modules() if isinstance(m, GroupQuantLinear))
    assert per_param["quantized_linear"] == pytest.approx((attn * 1 + mlp * 0.5 + scales) / (attn + mlp))


def test_dequantize_model_gives_float_linears_with_the_same_outputs():
    model = tiny_llama()
    quantize_model_zeroquant(model, group_size=32, act_bits=16)
    quantized = _logits(model, IDS)
    dequantize_model(model)
    assert not any(isinstance(m, GroupQuantLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, IDS), quantized, rtol=1e-4, atol=1e-4)


def test_from_pretrained_quantizes_while_loading_and_roundtrips(bloom_dir, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(bloom_dir).eval()
    config = ZeroQuantConfig(group_size=32)
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=config).eval()
    block = model.transformer.h[0]
    assert isinstance(block.self_attention.query_key_value, GroupQuantLinear)
    assert block.self_attention.query_key_value.bits == 8 and block.mlp.dense_h_to_4h.bits == 4
    assert not isinstance(model.lm_head, GroupQuantLinear)
    # Same codes as converting the loaded float model.
    quantize_model_zeroquant(reference, group_size=32)
    torch.testing.assert_close(_logits(model, IDS), _logits(reference, IDS), rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.transformer.h[1].mlp.dense_4h_to_h, GroupQuantLinear)
    torch.testing.assert_close(_logits(reloaded, IDS), _logits(model, IDS), rtol=0, atol=0)


def test_module_patterns_and_skips_are_honoured(bloom_dir):
    config = ZeroQuantConfig(module_bits={r"\.h\.1\.": 4}, default_bits=8, skip_modules=["transformer.h.0.mlp"], group_size=32)
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=config)
    assert type(model.transformer.h[0].mlp.dense_h_to_4h) is nn.Linear
    assert model.transformer.h[0].self_attention.dense.bits == 8
    assert model.transformer.h[1].self_attention.dense.bits == 4


@pytest.mark.parametrize("kwargs,match", [(dict(default_bits=3), "bits must be 8 or 4"), (dict(act_bits=4), "act_bits"), (dict(group_size=20), "multiple of 32")])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZeroQuantConfig(**kwargs)


def test_lora_trains_only_adapters_and_merges_by_requantizing(bloom_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=ZeroQuantConfig(group_size=32, act_bits=16))
    lora = zeroquant_lora_config(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    wrapped = peft_model.base_model.model.transformer.h[0].mlp.dense_h_to_4h
    assert isinstance(wrapped, LoraGroupQuantLinear)
    peft_model(input_ids=IDS, labels=IDS).loss.backward()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)

    peft_model.save_pretrained(tmp_path)
    with_adapter = _logits(peft_model, IDS)
    base = AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=ZeroQuantConfig(group_size=32, act_bits=16))
    reloaded = load_zeroquant_adapter(base, tmp_path)
    torch.testing.assert_close(_logits(reloaded, IDS), with_adapter, rtol=1e-5, atol=1e-5)

    merged = reloaded.merge_and_unload()
    assert isinstance(merged.transformer.h[0].mlp.dense_h_to_4h, GroupQuantLinear)
    # Merging costs one requantization of the weight: close, not equal.
    rel = (_logits(merged, IDS) - with_adapter).norm() / with_adapter.norm()
    assert rel < 0.05
