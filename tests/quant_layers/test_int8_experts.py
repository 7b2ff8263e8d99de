"""Int8Experts: transformers 5's fused MoE experts in LLM.int8() form, against the original module."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bytetune.quant_layers import dequantize_model, model_bytes, quantize_model
from bytetune.quant_layers.int8_embedding import quantize_embeddings
from bytetune.quant_layers.int8_experts import Int8Experts, is_fused_experts, router_names

# Tiny configs of four MoE families; the experts hold most of the weight, as in the real models.
FAMILIES = {
    "mixtral": dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=96),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=80, intermediate_size=80,
                      decoder_sparse_step=1, mlp_only_layers=[], head_dim=16),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=72, shared_expert_intermediate_size=48,
                      intermediate_size=72, decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=64),
}  # fmt: skip


def tiny_moe(family: str, seed: int = 0, hidden: int = 48, vocab: int = 300, layers: int = 2, **overrides):
    config = AutoConfig.for_model(
        family, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False, **{**FAMILIES[family], **overrides},
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _experts(model):
    return [(n, m) for n, m in model.named_modules() if is_fused_experts(m) or isinstance(m, Int8Experts)]


def _routing(tokens, experts, top_k, gen, skip_expert=None):
    logits = torch.randn(tokens, experts, generator=gen)
    if skip_expert is not None:
        logits[:, skip_expert] = -1e9  # an expert that gets no token
    weights, index = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_experts_forward_and_input_grad_match_the_float_module(family):
    _check_against_float_module(family)


def test_experts_triton_path_matches_the_float_module(kernel_path):
    # The interpreted Triton path is slow: one small family member runs it (the kernels' tests
    # cover more shapes); the weights are quantized beforehand by the reference (one-time work).
    _check_against_float_module("mixtral", tokens=9, hidden=32, intermediate_size=40)


def _check_against_float_module(family, tokens=13, **sizes):
    model = tiny_moe(family, **sizes)
    name, float_experts = _experts(model)[0]
    forced = os.environ.pop("BYTETUNE_FORCE_TRITON", None)
    int8_experts = Int8Experts.from_experts(float_experts)
    if forced is not None:
        os.environ["BYTETUNE_FORCE_TRITON"] = forced
    assert int8_experts.gate_up_proj.dtype == torch.int8 and int8_experts.down_proj.dtype == torch.int8
    dequantized = copy.deepcopy(float_experts)
    for p in ("gate_up_proj", "down_proj"):
        getattr(dequantized, p).data = int8_experts.dequantized_weight(p)
    gen = torch.Generator().manual_seed(1)
    e = float_experts.num_experts
    x = torch.randn(tokens, int8_experts.hidden_dim, generator=gen)
    x[:, 3] *= 12  # an outlier feature column
    index, weights = _routing(tokens, e, 2, gen, skip_expert=e - 1)
    grad_out = torch.randn(tokens, int8_experts.hidden_dim, generator=gen)
    results = {}
    for label, module in (("int8", int8_experts), ("dequantized", dequantized), ("float", float_experts)):
        xi = x.clone().requires_grad_(True)
        y = module(xi, index, weights)
        (y * grad_out).sum().backward()
        results[label] = (y.detach(), xi.grad)
    y8, g8 = results["int8"]
    yd, gd = results["dequantized"]
    yf, gf = results["float"]
    # Only the activations are quantized against the dequantized module: per-token int8 costs
    # about 1 %. The input gradient is straight-through (exact products with the dequantized
    # weights), but it flows through act(gate) * up at the int8 forward's values: the same order.
    assert _rel(y8, yd) < 0.02
    assert _rel(g8, gd) < 0.02
    # Against the float weights, the weight rounding adds about as much again.
    assert _rel(y8, yf) < 0.04 and _rel(g8, gf) < 0.02
    # No token of the starved expert: the same answer as the module that loops over hit experts.
    assert torch.isfinite(y8).all()


def test_outlier_columns_take_the_16_bit_path():
    model = tiny_moe("mixtral")
    _, float_experts = _experts(model)[0]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(23, 48, generator=gen)
    x[:, 7] *= 60
    index, weights = _routing(23, 5, 2, gen)
    with torch.no_grad():
        yf = float_experts(x, index, weights)
        errors = {}
        for threshold in (6.0, 0.0):
            int8 = Int8Experts.from_experts(float_experts, threshold=threshold)
            errors[threshold] = _rel(int8(x, index, weights), yf)
    assert errors[6.0] * 2 < errors[0.0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantize_model_converts_the_experts_and_keeps_routers(family):
    model = tiny_moe(family)
    routers = router_names(model)
    assert routers, "every MoE block has a router"
    reference = copy.deepcopy(model)
    report = quantize_model(model)
    experts = _experts(model)
    assert experts and all(isinstance(m, Int8Experts) for _, m in experts)
    assert report.n_experts_modules == len(experts) == 2
    for _, module in experts:
        for p in ("gate_up_proj", "down_proj"):
            codes = getattr(module, p)
            # 1 byte per expert weight, a float32 scale per expert row
            assert codes.dtype == torch.int8 and codes.element_size() * codes.numel() == codes.numel()
            assert getattr(module, f"{p}_scale").dtype == torch.float32
    for name in routers:  # routers stay float
        weights = [t for t in model.get_submodule(name).parameters()]
        assert weights and all(t.dtype == torch.float32 for t in weights)
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
        expected = reference(ids).logits
    assert _rel(logits, expected) < 0.05
    dequantize_model(model)
    assert not any(isinstance(m, Int8Experts) for m in model.modules())
    with torch.no_grad():
        assert _rel(model(ids).logits, expected) < 0.02


def test_tiny_mixtral_whole_model_bytes():
    # A tiny Mixtral whose experts dominate (8 experts, intermediate 4x hidden), embeddings
    # untied: the whole model in int8 (experts, attention, embeddings and head) <= 0.30x fp32.
    config = AutoConfig.for_model(
        "mixtral", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=512, tie_word_embeddings=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fp32 = model_bytes(model)
    report = quantize_model(model)
    expert_bytes = sum(getattr(m, p).numel() for _, m in _experts(model) for p in ("gate_up_proj", "down_proj"))
    assert expert_bytes == 2 * 8 * 3 * 256 * 64  # int8: one byte each
    blocks_only = report.bytes_after / fp32
    quantize_embeddings(model)
    whole = model_bytes(model) / fp32
    assert whole <= 0.30, (blocks_only, whole)
    assert blocks_only < 0.35


def test_lora_term_is_peft_delta_weight_per_expert():
    # The low-rank term LoraInt8Experts adds inside the int8 forward equals x @ delta_e.T with
    # delta_e from PEFT's own ParamWrapper.get_delta_weight (its interleaved B layout), per expert.
    from peft import get_peft_model

    from bytetune.quant_layers.experts_lora import LoraInt8Experts
    from bytetune.quant_layers.lora import lora_config

    model = tiny_moe("mixtral")
    quantize_model(model)
    peft_model = get_peft_model(
        model, lora_config(r=3, lora_alpha=6, target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"],
                           init_lora_weights=False)
    )  # fmt: skip
    wrappers = [m for m in peft_model.modules() if isinstance(m, LoraInt8Experts)]
    assert {w.parameter_name for w in wrappers} == {"gate_up_proj", "down_proj"}
    gen = torch.Generator().manual_seed(4)
    for wrapper in wrappers:
        delta = wrapper.get_delta_weight("default").float()  # [E, out, in]
        x = torch.randn(11, delta.shape[2], generator=gen)
        experts = torch.randint(0, delta.shape[0], (11,), generator=gen)
        with torch.no_grad():
            term = wrapper._lora_term(x, experts)
        expected = torch.einsum("ti,toi->to", x.double(), delta.double()[experts])
        assert torch.allclose(term.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_triton_path_never_waits_for_the_device(monkeypatch):
    # The GPU route (routing sort, tile table, per-expert outliers, grouped kernels) has fixed
    # shapes: no nonzero, no .item() / .tolist(). Checked on CPU tensors through the interpreted
    # Triton kernels; the weights are quantized beforehand (one-time work, outside the check).
    from bytetune.kernels.dispatch import HAS_TRITON

    from .conftest import no_host_sync

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    model = tiny_moe("mixtral", hidden=32, intermediate_size=40)
    _, float_experts = _experts(model)[0]
    int8 = Int8Experts.from_experts(float_experts)
    monkeypatch.setenv("BYTETUNE_FORCE_TRITON", "1")
    from bytetune.kernels import int8_experts as kernels

    launched = []
    for name in ("grouped_int8_linear_triton", "grouped_int8_grad_input_triton"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: launched.append(_n) or _f(*a))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 32, generator=gen)
    x[:, 2] *= 20  # outlier columns, so the outlier search really runs
    index, weights = _routing(9, int8.num_experts, 2, gen, skip_expert=0)
    x.requires_grad_(True)
    with no_host_sync() as detector:
        int8(x, index, weights).sum().backward()
    assert "aten.topk.default" in detector.seen and x.grad is not None
    assert launched.count("grouped_int8_linear_triton") == 2 and launched.count("grouped_int8_grad_input_triton") == 2


def test_quantize_on_load_builds_int8_experts(tmp_path):
    # from_pretrained(..., quantization_config=Int8Config()) quantizes each fused expert weight as
    # it is read: the same codes and scales as quantize_model on the loaded float model.
    from transformers import AutoModelForCausalLM as Auto

    from bytetune.quant_layers import Int8Config

    model = tiny_moe("qwen3_moe")
    model.save_pretrained(tmp_path)
    loaded = Auto.from_pretrained(tmp_path, quantization_config=Int8Config(threshold=6.0)).eval()
    quantize_model(model)
    pairs = list(zip(_experts(loaded), _experts(model)))
    assert len(pairs) == 2
    for (_, a), (_, b) in pairs:
        assert isinstance(a, Int8Experts)
        for p in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(a, p), getattr(b, p)) and torch.equal(getattr(a, f"{p}_scale"), getattr(b, f"{p}_scale"))
    for name in router_names(loaded):
        assert all(t.dtype == torch.float32 for t in loaded.get_submodule(name).parameters())
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
