"""Swapping a loaded model's linear layers for Int8Linear one layer at a time, and back: what both
frozen quantized layers (Int8Linear, GroupQuantLinear) share at the model level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from bytetune.quant_layers.file_backed import copy_out_of_file_mappings
from bytetune.quant_layers.frozen_linear import FrozenQuantLinear
from bytetune.quant_layers.int8_config import Int8Config
from bytetune.quant_layers.int8_embedding import dequantize_embeddings
from bytetune.quant_layers.int8_experts import Int8Experts, dequantized_experts, quantize_experts_modules, router_names
from bytetune.quant_layers.int8_linear import DEFAULT_THRESHOLD, Int8Linear, is_conv1d


@dataclass
class QuantizationReport:
    """What quantize_model did. Bytes count every parameter and buffer of the model once."""

    bytes_before: int
    bytes_after: int
    n_quantized: int
    quantized_params: int = 0  # weight elements now stored as int8 (1 byte each)
    n_experts_modules: int = 0  # fused MoE experts modules now Int8Experts (counted in n_quantized)

    def __str__(self) -> str:
        mib = 1024 * 1024
        return (
            f"{self.n_quantized} layers quantized ({self.quantized_params} weights): "
            f"{self.bytes_before / mib:.2f} MiB -> {self.bytes_after / mib:.2f} MiB "
            f"({self.bytes_after / max(self.bytes_before, 1):.1%})"
        )


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers; tied tensors are counted once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = id(tensor) if tensor.device.type == "meta" else (tensor.data_ptr(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def default_skip_names(model: nn.Module) -> set[str]:
    """Names of the output head and of any layer whose weight is tied to an embedding.

    transformers keeps these in 16-bit (the head dominates the output error and a tied weight
    would be quantized under the embedding too).
    """
    names: set[str] = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        elif getattr(module, "weight", None) is not None and id(module.weight) in embedding_weights:
            names.add(name)
    return names


def is_quantizable(module: nn.Module) -> bool:
    # Any frozen quantized layer (Int8Linear, GroupQuantLinear, Int8Head) is a Linear already done.
    return (isinstance(module, nn.Linear) and not isinstance(module, FrozenQuantLinear)) or is_conv1d(module)


@torch.no_grad()
def quantize_model(
    model: nn.Module, threshold: float = DEFAULT_THRESHOLD, skip: Iterable[str] = ()
) -> QuantizationReport:
    """Replace, in place, every nn.Linear / Conv1D of ``model`` by an Int8Linear.

    The fused experts of mixture-of-experts models (transformers 5's 3-D ``gate_up_proj`` /
    ``down_proj``) become Int8Experts; MoE routers stay in float.

    Skipped: the output head, layers tied to an embedding, and modules matching a ``skip``
    pattern, matched as transformers matches ``modules_to_not_convert``: a name prefix ending at
    a module boundary ("transformer.h.0"), a regex with the same boundary ("h\\.[01]\\.mlp"),
    or a suffix ("lm_head", "mlp.dense_4h_to_h"). Each layer's float weight is freed as soon as
    it is quantized, so the peak is the model plus one layer; the float tensors left are copied
    out of the checkpoint's file mapping, if they are in one, so that it is released.

    Marks the model 8-bit loaded (PEFT reads it) and, on a transformers model, records an
    Int8Config in ``model.config`` so that ``save_pretrained`` writes an int8 checkpoint that
    ``from_pretrained`` loads back as Int8Linear layers.
    """
    skip = list(skip)
    skipped = default_skip_names(model) | router_names(model)
    bytes_before = model_bytes(model)
    # Names only: holding the modules would keep every float weight alive until the end.
    targets = [
        name
        for name, module in model.named_modules()
        if name and is_quantizable(module) and name not in skipped and should_convert_module(name, skip)
    ]
    quantized_params = 0
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        float_layer = getattr(parent, child_name)
        int8_layer = Int8Linear.from_linear(float_layer, threshold=threshold)
        int8_layer.train(float_layer.training)
        setattr(parent, child_name, int8_layer)
        quantized_params += int8_layer.weight.numel()
    n_experts, expert_params = quantize_experts_modules(model, threshold=threshold, skip=skip)
    quantized_params += expert_params
    if targets or n_experts:
        copy_out_of_file_mappings(model)
        mark_kbit_loaded(model)
        if hasattr(getattr(model, "config", None), "to_dict"):
            model.config.quantization_config = Int8Config(threshold, skip_modules=sorted(set(skip) | skipped))
    return QuantizationReport(
        bytes_before=bytes_before,
        bytes_after=model_bytes(model),
        n_quantized=len(targets) + n_experts,
        quantized_params=quantized_params,
        n_experts_modules=n_experts,
    )


def mark_kbit_loaded(model: nn.Module) -> None:
    """Flag the model the way transformers flags bitsandbytes 8-bit models.

    PEFT only enables input gradients for gradient checkpointing on models that say so.
    """
    model.is_loaded_in_8bit = True


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace, in place, every frozen quantized layer of ``model`` (Int8Linear, GroupQuantLinear)
    by an nn.Linear holding its dequantized weight in ``dtype``; the inverse of quantize_model /
    quantize_model_zeroquant (and of quantize_embeddings) up to the quantization error."""
    dequantize_embeddings(model, dtype)  # first: it re-ties a tied head to the float embeddings
    names = [name for name, module in model.named_modules() if isinstance(module, FrozenQuantLinear)]
    for name in names:
        model.set_submodule(name, dequantized_linear(model.get_submodule(name), dtype))
    experts = [name for name, module in model.named_modules() if isinstance(module, Int8Experts)]
    for name in experts:
        model.set_submodule(name, dequantized_experts(model.get_submodule(name), dtype))
    names += experts
    if names and getattr(model, "is_loaded_in_8bit", False):
        model.is_loaded_in_8bit = False
    return model


def dequantized_linear(layer: FrozenQuantLinear, dtype: torch.dtype, weight: torch.Tensor | None = None) -> nn.Module:
    """An nn.Linear (frozen, same device and train mode) with ``layer``'s dequantized weight, or
    ``weight`` ([out, in]) instead. A layer quantized from transformers' Conv1D (GPT-2) becomes a
    Conv1D again, weight stored [in, out]: saved, it has the original checkpoint's layout."""
    device = layer.weight.device
    weight = layer.dequantized_weight(dtype) if weight is None else weight
    weight = weight.to(device, dtype)
    if getattr(layer, "source_is_conv1d", False):
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            float_layer = Conv1D(layer.out_features, layer.in_features)
        float_layer.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        float_layer.bias = nn.Parameter(
            torch.zeros(layer.out_features, device=device, dtype=dtype) if layer.bias is None else
            layer.bias.detach().to(device, dtype), requires_grad=False)
        float_layer.train(layer.training)
        return float_layer
    float_layer = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype)
    float_layer.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        float_layer.bias = nn.Parameter(layer.bias.detach().to(device, dtype), requires_grad=False)
    float_layer.train(layer.training)
    return float_layer


def forget_quantization(model: nn.Module) -> None:
    """Drop every mark of quantization from a model whose layers are float again, so that
    ``save_pretrained`` writes a plain checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    if getattr(getattr(model, "config", None), "_is_quantized", False):
        model.config._is_quantized = False
