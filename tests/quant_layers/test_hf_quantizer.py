import gc
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

import bytetune
from bytetune import Int8Config, Int8Linear, quantize_model
from bytetune.quant_layers import hf_quantizer

VOCAB = 320
BLOOM_LINEARS = {
    f"transformer.h.{i}.{name}"
    for i in range(2)
    for name in ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
}


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=VOCAB)).eval()
    path = tmp_path_factory.mktemp("bloom")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def int8_names(model):
    return {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def test_quantize_while_loading(bloom_dir, ids):
    reference = AutoModelForCausalLM.from_pretrained(bloom_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=Int8Config(threshold=6.0)).eval()

    assert int8_names(model) == BLOOM_LINEARS
    assert type(model.lm_head) is nn.Linear
    assert model.is_loaded_in_8bit
    layer = model.transformer.h[1].mlp.dense_4h_to_h
    assert layer.threshold == 6.0
    float_weight = reference.transformer.h[1].mlp.dense_4h_to_h.weight.detach()
    absmax = float_weight.abs().amax(dim=1)
    torch.testing.assert_close(layer.weight_scale, absmax)
    codes = torch.round(float_weight * 127 / absmax[:, None])
    assert layer.weight.dtype == torch.int8 and (layer.weight.float() - codes).abs().max() <= 1
    # Same layers, same codes as converting the loaded float model.
    quantize_model(reference, threshold=6.0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_skip_modules(bloom_dir):
    config = Int8Config(threshold=0.0, skip_modules=["transformer.h.0", "dense_h_to_4h"])
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=config)
    assert int8_names(model) == {"transformer.h.1.self_attention.query_key_value", "transformer.h.1.self_attention.dense",
                                 "transformer.h.1.mlp.dense_4h_to_h"}
    assert all(m.threshold == 0.0 for m in model.modules() if isinstance(m, Int8Linear))


def test_save_and_reload_quantized_checkpoint(bloom_dir, ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=Int8Config(threshold=6.0)).eval()
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved_config["quant_method"] == "bytetune_int8" and saved_config["threshold"] == 6.0
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_tensor("transformer.h.0.mlp.dense_h_to_4h.weight").dtype == torch.int8
        assert f.get_tensor("transformer.h.0.mlp.dense_h_to_4h.weight_scale").dtype == torch.float32

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert int8_names(reloaded) == BLOOM_LINEARS
    for name in BLOOM_LINEARS:
        assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_bf16_load_keeps_float32_scales(bloom_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=Int8Config(), dtype=torch.bfloat16)
    layer = model.transformer.h[0].self_attention.query_key_value
    assert layer.bias.dtype == torch.bfloat16 and layer.weight_scale.dtype == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(bloom_dir).eval()
    with torch.no_grad():
        logits = model.eval()(ids).logits
        assert logits.dtype == torch.bfloat16
        assert relative_error(logits, reference(ids).logits) <= 3e-2


def test_conv1d_checkpoint(tmp_path, ids):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=Int8Config()).eval()
    assert len(int8_names(model)) == 8
    assert model.transformer.h[0].attn.c_attn.weight.shape == (192, 64)  # [out, in] although Conv1D stored [in, out]
    with torch.no_grad():
        assert relative_error(model(ids).logits, reference(ids).logits) <= 1e-2


def test_weights_are_quantized_one_at_a_time(bloom_dir, monkeypatch):
    """When a weight is quantized, no other linear weight of the model is held in float."""
    float_weights_alive = []
    original_convert = hf_quantizer.Int8Quantize.convert

    def counting_convert(self, input_dict, **kwargs):
        shapes = {(192, 64), (64, 64), (256, 64), (64, 256)}
        alive = [
            o for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.device.type != "meta" and tuple(o.shape) in shapes
        ]
        float_weights_alive.append(len(alive))
        return original_convert(self, input_dict, **kwargs)

    monkeypatch.setattr(hf_quantizer.Int8Quantize, "convert", counting_convert)
    AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=Int8Config())
    assert len(float_weights_alive) == len(BLOOM_LINEARS)
    assert max(float_weights_alive) <= 1, float_weights_alive


def test_device_map_cpu_and_disk_offload(bloom_dir, ids, tmp_path):
    """Layers on cpu are int8; layers offloaded to disk stay float (as with bitsandbytes)."""
    int8_except_h1 = AutoModelForCausalLM.from_pretrained(
        bloom_dir, quantization_config=Int8Config(skip_modules=["transformer.h.1"])
    ).eval()
    device_map = {name: "cpu" for name in ("transformer.word_embeddings", "transformer.word_embeddings_layernorm",
                                           "transformer.h.0", "transformer.ln_f", "lm_head")}
    device_map["transformer.h.1"] = "disk"
    offloaded = AutoModelForCausalLM.from_pretrained(
        bloom_dir, quantization_config=Int8Config(), device_map=device_map, offload_folder=str(tmp_path / "a")
    ).eval()
    assert int8_names(offloaded) == int8_names(int8_except_h1)
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, int8_except_h1(ids).logits)

    # "auto" with too little memory: the resolved map sends everything to disk, so nothing is int8.
    auto = AutoModelForCausalLM.from_pretrained(
        bloom_dir, quantization_config=Int8Config(), device_map="auto", max_memory={"cpu": "60KB"},
        offload_folder=str(tmp_path / "b"),
    ).eval()
    assert "disk" in set(auto.hf_device_map.values()) and not int8_names(auto)
    reference = AutoModelForCausalLM.from_pretrained(bloom_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, reference(ids).logits)


def test_int8_checkpoint_offloads_to_disk_as_int8(bloom_dir, ids, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, quantization_config=Int8Config()).eval()
    model.save_pretrained(tmp_path / "int8")
    device_map = {name: "cpu" for name in ("transformer.word_embeddings", "transformer.word_embeddings_layernorm",
                                           "transformer.h.0", "transformer.ln_f", "lm_head")}
    device_map["transformer.h.1"] = "disk"
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "int8", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert int8_names(offloaded) == BLOOM_LINEARS
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, model(ids).logits)


def test_registered_on_import():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["bytetune_int8"] is bytetune.Int8Config
    assert AUTO_QUANTIZER_MAPPING["bytetune_int8"] is hf_quantizer.Int8HfQuantizer
    hf_quantizer.register()  # a second registration is a no-op, not an error


def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        Int8Config(threshold=-1)


def test_quantize_model_output_saves_and_reloads_as_int8(bloom_dir, ids, tmp_path):
    """The GGUF path: load in float, quantize_model(), save_pretrained, from_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(bloom_dir).eval()
    quantize_model(model, threshold=0.0, skip=["transformer.h.0"])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert int8_names(reloaded) == int8_names(model) == {n for n in BLOOM_LINEARS if n.startswith("transformer.h.1")}
    assert all(m.threshold == 0.0 for m in reloaded.modules() if isinstance(m, Int8Linear))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
