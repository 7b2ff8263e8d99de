"""Int8Embedding / Int8Head and quantize_embeddings on tiny BLOOM and Llama models (tied and
untied heads): one shared int8 table when tied, outputs equal to the float model on the
dequantized tables, LoRA still only on the block linears, the inverse conversion."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

from bytetune.quant_layers.convert import dequantize_model, model_bytes
from bytetune.quant_layers.int8_embedding import (
    Int8Embedding,
    Int8Head,
    dequantize_embeddings,
    quantize_embeddings,
)

from ..tolerances import assert_close_to_scale

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 301


def tiny_model(kind: str, tied: bool):
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    else:
        config = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config).eval()


def dequantized_float_copy(model):
    """The float model whose tables are the int8 ones dequantized: what the int8 model must equal."""
    import copy

    reference = copy.deepcopy(model)
    return dequantize_embeddings(reference)


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("bloom", True)])
def test_quantized_model_equals_the_float_model_on_the_dequantized_tables(kind, tied):
    model = tiny_model(kind, tied)
    float_logits_before = None
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        float_logits_before = model(ids).logits
    report = quantize_embeddings(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, Int8Embedding) and isinstance(head, Int8Head)
    assert head.tied == tied and (head.weight is embedding.weight) == tied
    assert report["embedding_bytes"] == VOCAB * 32 + 4 * VOCAB
    assert report["head_bytes"] == (0 if tied else VOCAB * 32 + 4 * VOCAB)
    reference = dequantized_float_copy(model)
    with torch.no_grad():
        logits = model(ids).logits
        expected = reference(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # and int8 rows are close to the float tables they replaced
    assert (logits - float_logits_before).abs().max() < 0.05 * float_logits_before.abs().max()


def test_a_tied_head_shares_one_table_and_its_scales_through_dtype_and_device_moves():
    model = tiny_model("llama", tied=True)
    float_bytes = model_bytes(model)
    quantize_embeddings(model)
    table = VOCAB * 32
    assert float_bytes - model_bytes(model) == table * 4 - (table + 4 * VOCAB)  # one float table -> one int8 table
    model.to(torch.bfloat16)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding.weight.dtype == torch.int8 and embedding.weight_scale.dtype == torch.float32
    assert head.row_scale is embedding.weight_scale and "weight_scale" not in dict(head.named_buffers())
    assert embedding(torch.tensor([[1, 2]])).dtype == torch.bfloat16
    logits = model(torch.randint(0, VOCAB, (1, 5))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_head_backward_gives_the_input_gradient_of_the_dequantized_linear():
    linear = nn.Linear(40, 257, bias=True)
    head = Int8Head.from_linear(linear)
    reference = nn.Linear(40, 257, bias=True)
    reference.weight.data = head.dequantized_weight()
    reference.bias.data = head.bias.data.clone()
    x1 = torch.randn(3, 7, 40, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    grad_out = torch.randn(3, 7, 257)
    (head(x1) * grad_out).sum().backward()
    (reference(x2) * grad_out).sum().backward()
    assert_close_to_scale(x1.grad, x2.grad, rtol=1e-5)
    assert not head.weight.requires_grad


@pytest.mark.parametrize("kind", ["llama", "bloom"])
def test_lora_all_linear_targets_the_blocks_not_the_int8_head(kind):
    model = tiny_model(kind, tied=True)
    quantize_embeddings(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert adapted and not any("lm_head" in name or "embed" in name for name in adapted)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


@pytest.mark.parametrize("tied", [True, False])
def test_dequantize_model_restores_float_layers_and_the_tie(tied):
    model = tiny_model("llama", tied)
    quantize_embeddings(model)
    dequantize_model(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embedding) is nn.Embedding and type(head) is nn.Linear
    assert (head.weight is embedding.weight) == tied


def test_bad_inputs_name_the_problem():
    model = tiny_model("llama", tied=True)
    quantize_embeddings(model)
    with pytest.raises(ValueError, match="int8 already"):
        quantize_embeddings(model)
    with pytest.raises(TypeError, match="transformers model"):
        quantize_embeddings(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="tied"):
        model.get_output_embeddings().set_weight(torch.zeros(VOCAB, 32))


def test_head_under_bf16_autocast_gives_bf16_logits_like_nn_linear():
    linear = nn.Linear(48, 300, bias=False)
    head = Int8Head.from_linear(linear)
    x = torch.randn(5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        expected = nn.functional.linear(x, head.dequantized_weight())
    assert logits.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected.float(), rtol=2e-2, atol=2e-2)
