import copy

import pytest
import torch
from torch import nn
from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

from bytetune import Int8Linear, quantize_model
from bytetune.quant_layers import dequantize_model, model_bytes


def tiny_bloom(tie: bool = True) -> BloomForCausalLM:
    torch.manual_seed(0)
    config = BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=320, tie_word_embeddings=tie)
    return BloomForCausalLM(config).eval()


def relative_error(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def linear_names(model, cls):
    return {name for name, m in model.named_modules() if isinstance(m, cls)}


@pytest.mark.parametrize("tie", [True, False])
def test_quantizes_every_linear_but_the_head(tie):
    model = tiny_bloom(tie)
    float_linears = linear_names(model, nn.Linear)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    report = quantize_model(model, threshold=6.0)

    assert linear_names(model, Int8Linear) == float_linears - {"lm_head"}
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    if tie:
        assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert report.n_quantized == 8  # 4 linears per block
    with torch.no_grad():
        assert relative_error(model(ids).logits, expected) <= 1e-2
    assert model.is_loaded_in_8bit


def test_report_counts_bytes_once_for_tied_weights():
    model = tiny_bloom(tie=True)
    linear_params = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    linear_rows = sum(m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    all_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once by parameters()
    report = quantize_model(model)
    assert report.bytes_before == 4 * all_params
    # Each quantized weight drops from 4 bytes to 1, and gains a float32 scale per row.
    assert report.bytes_after == report.bytes_before - 3 * linear_params + 4 * linear_rows
    assert report.quantized_params == linear_params
    assert model_bytes(model) == report.bytes_after


def test_skip_patterns():
    model = tiny_bloom()
    report = quantize_model(model, skip=["transformer.h.0", "dense_4h_to_h"])
    quantized = linear_names(model, Int8Linear)
    assert quantized == {
        "transformer.h.1.self_attention.query_key_value",
        "transformer.h.1.self_attention.dense",
        "transformer.h.1.mlp.dense_h_to_4h",
    }
    assert report.n_quantized == 3


def test_conv1d_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=200, n_positions=64)).eval()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    report = quantize_model(model)
    assert report.n_quantized == 8  # c_attn, c_proj, c_fc, mlp c_proj per block
    with torch.no_grad():
        assert relative_error(model(ids).logits, expected) <= 1e-2


def test_dequantize_model_restores_float_layers():
    model = tiny_bloom()
    reference = copy.deepcopy(model)
    quantize_model(model)
    dequantize_model(model, dtype=torch.float32)
    assert not linear_names(model, Int8Linear)
    for (name, restored), original in zip(model.named_parameters(), reference.parameters()):
        step = original.detach().abs().amax() / 127
        assert (restored - original).abs().max() <= step, name
