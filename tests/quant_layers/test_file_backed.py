"""Quantizing a model loaded from safetensors lets go of the checkpoint's file mapping: the float
tensors that stay are copied into ordinary memory, values and ties unchanged."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, BloomForCausalLM

from bytetune import quantize_model
from bytetune.quant_layers.file_backed import _file_mappings, copy_out_of_file_mappings
from bytetune.quant_layers.int8_config import Int8Config
from bytetune.quant_layers.int8_embedding import quantize_embeddings

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def in_a_file_mapping(tensor: torch.Tensor) -> bool:
    address = tensor.untyped_storage().data_ptr()
    return any(start <= address < end for start, end in _file_mappings())


def float_tensors(model):
    return [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=320))
    model.save_pretrained(tmp_path)
    return tmp_path


def loaded(checkpoint, **kwargs):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kwargs).eval()


def test_the_premise_transformers_loads_views_into_the_file(checkpoint):
    assert any(in_a_file_mapping(t) for t in float_tensors(loaded(checkpoint)))


def test_quantize_model_leaves_no_tensor_in_the_checkpoint_file(checkpoint):
    model = loaded(checkpoint)
    assert any(in_a_file_mapping(t) for t in float_tensors(model))
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    embedding_before = model.transformer.word_embeddings.weight.detach().clone()
    quantize_model(model)
    assert not any(in_a_file_mapping(t) for t in float_tensors(model))
    assert torch.equal(model.transformer.word_embeddings.weight, embedding_before)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # still tied
    assert torch.isfinite(model(ids).logits).all()


def test_the_hf_quantizer_and_quantize_embeddings_leave_none_either(checkpoint):
    model = loaded(checkpoint, quantization_config=Int8Config())
    assert not any(in_a_file_mapping(t) for t in float_tensors(model))
    model = loaded(checkpoint)
    quantize_embeddings(model)
    assert not any(in_a_file_mapping(t) for t in float_tensors(model))


def test_tensors_in_ordinary_memory_are_not_copied():
    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=32, n_head=4, vocab_size=64))
    addresses = [t.data_ptr() for t in float_tensors(model)]
    assert copy_out_of_file_mappings(model) == 0
    assert [t.data_ptr() for t in float_tensors(model)] == addresses
