"""Filling a meta-device model from a float checkpoint (the loader FSDP2 and the pipeline share)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig

from bytetune import Int8Linear
from bytetune.quant_layers import quantize_model
from bytetune.quant_layers.loading import load_float_checkpoint


def dequantized(layer: Int8Linear) -> torch.Tensor:
    """The weight the codes stand for, from the convention (row absmax / 127), written out here."""
    return layer.weight.float() * layer.weight_scale[:, None] / 127.0


@pytest.mark.parametrize("rows,cols", [(7, 5), (33, 17)])
def test_load_float_weight_quantizes_per_row_into_the_allocated_layer(rows, cols):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 3, rows)[:, None]
    layer = Int8Linear(cols, rows, bias=False)
    codes_before = layer.weight
    layer.load_float_weight(weight)
    assert layer.weight is codes_before  # filled in place: FSDP2 and the pipeline allocate first
    assert torch.equal(layer.weight_scale, weight.abs().amax(dim=1))
    # each code is the nearest step of absmax/127: within half a step of the float weight
    step = weight.abs().amax(dim=1, keepdim=True) / 127.0
    assert ((dequantized(layer) - weight).abs() <= 0.5 * step * (1 + 1e-6)).all()


def test_load_float_weight_reads_a_conv1d_layout_transposed_and_names_a_wrong_shape():
    weight = torch.randn(6, 4)  # [in, out] as transformers' Conv1D stores it
    layer = Int8Linear(6, 4, bias=False)
    layer.source_is_conv1d = True
    layer.load_float_weight(weight)
    reference = Int8Linear(6, 4, bias=False)
    reference.load_float_weight(weight.t().contiguous())
    assert torch.equal(layer.weight, reference.weight)
    with pytest.raises(ValueError, match=r"the model expects \[4, 6\]"):
        Int8Linear(6, 4, bias=False).load_float_weight(torch.randn(4, 5), where="x.weight")


def test_a_meta_model_filled_from_a_checkpoint_equals_the_model_quantized_after_loading(tmp_path):
    from accelerate import init_empty_weights

    config = BloomConfig(vocab_size=96, hidden_size=32, n_layer=3, n_head=4)
    torch.manual_seed(0)
    float_model = AutoModelForCausalLM.from_config(config)
    float_model.save_pretrained(tmp_path)
    expected = AutoModelForCausalLM.from_pretrained(tmp_path)
    quantize_model(expected, skip=("lm_head",))

    with init_empty_weights(include_buffers=False):
        empty = AutoModelForCausalLM.from_config(config)
    empty.tie_weights()
    quantize_model(empty, skip=("lm_head",))
    reader = load_float_checkpoint(empty, tmp_path, torch.device("cpu"))
    got = dict(empty.state_dict())
    want = dict(expected.state_dict())
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # every checkpoint tensor read once (the tied head is the embeddings' tensor)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        stored = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
    assert reader.bytes_read == stored


def _empty(config):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        empty = AutoModelForCausalLM.from_config(config)
    empty.tie_weights()
    return empty


def _assert_same_state(got_model, want_model):
    got, want = dict(got_model.state_dict()), dict(want_model.state_dict())
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_int8_experts_fill_themselves_as_quantizing_the_float_module_does():
    # transformers 5 saves Mixtral's experts per expert (w1/w2/w3), not fused, so the loader reads
    # no MoE checkpoint yet; the layer's part of the protocol is checked on the fused tensors
    from transformers import MixtralConfig

    from bytetune.quant_layers.int8_experts import EXPERT_PARAMETERS, Int8Experts

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2)
    torch.manual_seed(1)
    experts = AutoModelForCausalLM.from_config(config).model.layers[0].mlp.experts
    with torch.no_grad():  # rows of very different magnitudes: a mixed-up row scale shows
        for name in EXPERT_PARAMETERS:
            getattr(experts, name).mul_(torch.logspace(-2, 2, getattr(experts, name).shape[1])[None, :, None])
    expected = Int8Experts.from_experts(experts)
    layer = Int8Experts(expected.num_experts, expected.hidden_dim, expected.intermediate_dim, experts.act_fn)
    filled = layer.load_from_checkpoint(lambda name: getattr(experts, name).detach().clone(), where="experts.{}")
    assert {id(t) for t in filled} == {id(t) for t in layer.state_dict(keep_vars=True).values()}
    for name, tensor in expected.state_dict().items():
        assert torch.equal(layer.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"experts.down_proj has shape"):
        layer.load_float_weight("down_proj", torch.randn(3, 32, 47), where="experts.down_proj")


def test_group_quant_layers_fill_themselves_as_quantizing_after_loading_does(tmp_path):
    from bytetune.quant_layers import quantize_model_zeroquant

    config = BloomConfig(vocab_size=96, hidden_size=64, n_layer=2, n_head=4)
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    bits = {"mlp": 4}  # INT4 (packed) MLP, INT8 attention: both code layouts
    expected = AutoModelForCausalLM.from_pretrained(tmp_path)
    quantize_model_zeroquant(expected, module_bits=bits, group_size=32, skip=("lm_head",))

    empty = _empty(config)
    quantize_model_zeroquant(empty, module_bits=bits, group_size=32, skip=("lm_head",))
    load_float_checkpoint(empty, tmp_path, torch.device("cpu"))
    _assert_same_state(empty, expected)


def test_a_layer_refuses_a_checkpoint_tensor_of_the_wrong_shape_naming_it(tmp_path):
    from bytetune.quant_layers.int8_embedding import Int8Embedding

    embedding = Int8Embedding(10, 4)
    with pytest.raises(ValueError, match=r"emb.weight in DIR has shape \(10, 5\), the model expects \[10, 4\]"):
        embedding.load_from_checkpoint(lambda name: torch.randn(10, 5), where="emb.{} in DIR")


def test_adapters_drawn_on_a_meta_base_keep_their_seeded_initial_weights(tmp_path):
    from peft import get_peft_model

    from bytetune.quant_layers.lora import LoraInt8Linear, lora_config

    config = BloomConfig(vocab_size=96, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)

    def with_adapters(base):
        quantize_model(base, skip=("lm_head",))
        torch.manual_seed(7)  # the adapters' draw, as the trainer seeds it
        # init_lora_weights="gaussian": lora_B is drawn too, so both matrices must come back
        return get_peft_model(base, lora_config(r=4, target_modules="all-linear", init_lora_weights="gaussian"))

    expected = with_adapters(AutoModelForCausalLM.from_pretrained(tmp_path))
    empty = with_adapters(_empty(config))
    layers = [m for m in empty.modules() if isinstance(m, LoraInt8Linear)]
    assert layers and all(p.device.type == "meta" for m in layers for p in m.parameters())
    load_float_checkpoint(empty, tmp_path, torch.device("cpu"))
    _assert_same_state(empty, expected)
    # the copies are handed back once: a second fill has nothing left to restore
    assert all(m.restore_initial_adapters() == [] for m in layers)
