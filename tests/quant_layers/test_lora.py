import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from bytetune import GroupQuantLinear, Int8Linear, quantize_model
from bytetune.quant_layers.group_lora import zeroquant_lora_config
from bytetune.quant_layers.lora import (
    LoraInt8Linear,
    export_merged,
    load_adapter,
    lora_config,
    merge_and_requantize,
    prepare_for_kbit_training,
)

# The module trains an adapter once (~10 s on 2 cores) and reuses it.
pytestmark = pytest.mark.slow

VOCAB = 320
LINEARS_PER_MODEL = 8


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def tiny_bloom() -> BloomForCausalLM:
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=VOCAB)).eval()


def int8_bloom(reference: BloomForCausalLM) -> BloomForCausalLM:
    model = copy.deepcopy(reference)
    quantize_model(model, threshold=6.0)
    return model


@pytest.fixture(scope="module")
def ids():
    # A repeating pattern a tiny model can learn in a few steps.
    pattern = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(1))
    return pattern.repeat(4, 4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ids):
    """An int8 tiny BLOOM with a LoRA adapter trained a few steps, its losses and its saved adapter."""
    reference = tiny_bloom()
    model = prepare_for_kbit_training(int8_bloom(reference))
    config = lora_config(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=True)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(12):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    peft_model.eval()
    adapter_dir = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(adapter_dir)
    return reference, peft_model, losses, adapter_dir


def test_all_linear_targets_every_int8_layer(trained):
    _, peft_model, _, _ = trained
    lora_layers = [m for m in peft_model.modules() if isinstance(m, LoraInt8Linear)]
    assert len(lora_layers) == LINEARS_PER_MODEL
    assert all(isinstance(m.get_base_layer(), Int8Linear) for m in lora_layers)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_training_reduces_loss(trained):
    _, _, losses, _ = trained
    assert losses[-1] < 0.9 * losses[0], losses


def test_adapter_files_are_plain_peft(trained):
    _, _, _, adapter_dir = trained
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    # "all-linear" was resolved to the module names, which an nn.Linear model has too.
    assert config["target_modules"] != "all-linear" and len(config["target_modules"]) == LINEARS_PER_MODEL
    assert (adapter_dir / "adapter_model.safetensors").is_file()


def test_adapter_loads_on_the_fp32_model_with_plain_peft(trained, ids):
    reference, peft_model, _, adapter_dir = trained
    fp32_peft = PeftModel.from_pretrained(copy.deepcopy(reference), adapter_dir).eval()
    with torch.no_grad():
        int8_logits = peft_model(input_ids=ids).logits
        fp32_logits = fp32_peft(input_ids=ids).logits
        base_logits = reference(input_ids=ids).logits
    # Within quantization error, and the adapter moved the outputs by much more than that error.
    error = relative_error(int8_logits, fp32_logits)
    assert error <= 1e-2
    assert relative_error(fp32_logits, base_logits) > 5 * error


@pytest.mark.parametrize("loader", ["bytetune", "plain_peft"])
def test_adapter_reloads_on_the_int8_model_identically(trained, ids, loader):
    reference, peft_model, _, adapter_dir = trained
    if loader == "bytetune":
        reloaded = load_adapter(int8_bloom(reference), adapter_dir)
        assert isinstance(reloaded.base_model.model.transformer.h[0].mlp.dense_4h_to_h, LoraInt8Linear)
    else:
        reloaded = PeftModel.from_pretrained(int8_bloom(reference), adapter_dir)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_load_adapter_trainable(trained):
    reference, _, _, adapter_dir = trained
    reloaded = load_adapter(int8_bloom(reference), adapter_dir, is_trainable=True)
    trainable = [n for n, p in reloaded.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * LINEARS_PER_MODEL


@pytest.mark.parametrize("registered", [True, False])
def test_merge_and_requantize(trained, ids, registered):
    reference, peft_model, _, adapter_dir = trained
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    if registered:
        reloaded = load_adapter(int8_bloom(reference), adapter_dir)
    else:
        reloaded = PeftModel.from_pretrained(int8_bloom(reference), adapter_dir)
    merged = merge_and_requantize(reloaded)
    layers = [m for m in merged.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == LINEARS_PER_MODEL and not isinstance(merged, PeftModel)
    with torch.no_grad():
        assert relative_error(merged(input_ids=ids).logits, expected) <= 2e-2


def test_peft_merge_adapter_requantizes(trained, ids):
    """PEFT's own merge/unmerge on LoraInt8Linear keep the base int8 and the outputs."""
    reference, peft_model, _, adapter_dir = trained
    reloaded = load_adapter(int8_bloom(reference), adapter_dir)
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
        reloaded.merge_adapter()
        layer = reloaded.base_model.model.transformer.h[0].mlp.dense_4h_to_h.get_base_layer()
        assert layer.weight.dtype == torch.int8
        assert relative_error(reloaded(input_ids=ids).logits, expected) <= 2e-2
        reloaded.unmerge_adapter()
        assert relative_error(reloaded(input_ids=ids).logits, expected) <= 2e-2


def test_export_merged_16bit(trained, ids, tmp_path):
    reference, _, _, adapter_dir = trained
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(reference), adapter_dir).eval()(input_ids=ids).logits
    exported = export_merged(load_adapter(int8_bloom(reference), adapter_dir), tmp_path, dtype=torch.bfloat16)
    assert not any(isinstance(m, Int8Linear) for m in exported.modules())
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.transformer.h[0].mlp.dense_4h_to_h.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert relative_error(reloaded(input_ids=ids).logits, expected) <= 2e-2


def test_prepare_for_kbit_training_keeps_16bit_params_unless_asked(ids):
    model = int8_bloom(tiny_bloom()).to(torch.bfloat16)
    prepare_for_kbit_training(model)
    assert model.transformer.word_embeddings.weight.dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())
    # Input grads are on, so checkpointed blocks still backpropagate into an adapter.
    peft_model = get_peft_model(model, lora_config(r=4, target_modules="all-linear"))
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    # lora_B starts at zero, so at the first step only lora_B gets a nonzero gradient.
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    upcast = prepare_for_kbit_training(int8_bloom(tiny_bloom()).to(torch.bfloat16), upcast_fp32=True)
    assert upcast.transformer.word_embeddings.weight.dtype == torch.float32
    assert upcast.transformer.h[0].mlp.dense_4h_to_h.weight.dtype == torch.int8


def test_peft_prepare_model_for_kbit_training_sees_an_8bit_model():
    model = prepare_model_for_kbit_training(int8_bloom(tiny_bloom()))
    assert model.is_gradient_checkpointing
    assert model.transformer.h[0].mlp.dense_4h_to_h.weight.dtype == torch.int8


def test_unregistered_config_still_trains(ids):
    """A plain LoraConfig wraps Int8Linear in PEFT's Linear; forward and backward still work."""
    model = int8_bloom(tiny_bloom())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------
# LoRA on both quantized layers under torch.autocast, on both kernel paths
# ------------------------------------------------------------------------------------------


class OneProjection(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def quantized_projection(base: str) -> torch.nn.Module:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    if base == "int8":
        return Int8Linear.from_linear(linear, threshold=6.0)
    return GroupQuantLinear.from_linear(linear, bits=4, group_size=32, act_bits=8)


@pytest.mark.parametrize("base", ["int8", "groupwise"])
def test_lora_follows_autocast(base, kernel_path):
    model = get_peft_model(
        OneProjection(quantized_projection(base)),
        zeroquant_lora_config(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False),
    )
    lora = model.base_model.model.proj
    A, B, scaling = lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.scaling["default"]
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(1))
    x[:, :, 5] = 9.0  # an outlier column for Int8Linear
    x.requires_grad_(True)
    grad_y = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.backward(grad_y)
    assert x.grad.dtype == torch.float32
    assert A.grad.dtype == B.grad.dtype == torch.float32

    # Float64 math on bf16-rounded operands: the base layer on a bf16 input (its own tests check
    # it against the references) plus the LoRA branch; the only other error is bf16 rounding.
    x_bf16 = x.detach().to(torch.bfloat16)
    with torch.no_grad():
        base_out = lora.get_base_layer()(x_bf16).double()
    x64, a64, b64 = x_bf16.double(), A.detach().bfloat16().double(), B.detach().bfloat16().double()
    g64 = grad_y.double()
    hidden = x64 @ a64.t()
    expected = base_out + scaling * hidden @ b64.t()
    assert relative_error(y.detach(), expected) <= 1e-2
    expected_grad_b = scaling * g64.reshape(-1, 40).t() @ hidden.reshape(-1, 4)
    expected_grad_a = scaling * (g64 @ b64).reshape(-1, 4).t() @ x64.reshape(-1, 96)
    weight = lora.get_base_layer().dequantized_weight().double()
    expected_grad_x = g64 @ (weight + scaling * b64 @ a64)
    assert relative_error(B.grad, expected_grad_b) <= 2e-2
    assert relative_error(A.grad, expected_grad_a) <= 2e-2
    assert relative_error(x.grad, expected_grad_x) <= 2e-2
