"""Frozen int8 word embeddings and output head (row-wise int8, float32 row scales).

On a large vocabulary the embeddings and the head are the biggest frozen tensors of a model that
transformers leaves in 16-bit (BLOOM: 250,880 x 14,336, 6.7 GiB in bf16, one tensor when tied).
Row-wise int8 halves them. The lookup gathers int8 rows and their scales and dequantizes only
those; the head multiplies 16-bit (or fp32) activations by the int8 rows (weight-only: no
activation quantization, so no outlier columns), and its input gradient never materializes the
float weight.

When the head is tied to the embeddings both layers hold the SAME int8 Parameter and the SAME
float32 scale tensor: one copy of the codes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bytetune.kernels.int8_head import embedding_lookup, int8_matmul_grad_input, quantize_rowwise, weight_only_matmul
from bytetune.kernels.constants import INT8_MAX
from bytetune.quant_layers.file_backed import copy_out_of_file_mappings
from bytetune.quant_layers.frozen_linear import FrozenQuantLinear
from bytetune.quant_layers.shards import local_rows, local_tensor

__all__ = ["Int8Embedding", "Int8Head", "WeightOnlyInt8Matmul", "dequantize_embeddings", "quantize_embeddings"]


# Rows quantized at a time: quantize_rowwise works in float32, so a whole 250k-row bf16 table
# would take a 14 GB temporary; slabs keep the peak at the table plus its int8 copy.
QUANTIZE_SLAB_ROWS = 8192


def quantize_rows_in_slabs(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rowwise over slabs of rows: (int8 codes, float32 row absmax), same values."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], QUANTIZE_SLAB_ROWS):
        stop = min(start + QUANTIZE_SLAB_ROWS, weight.shape[0])
        codes[start:stop], scales[start:stop] = quantize_rowwise(weight[start:stop])
    return codes, scales


class WeightOnlyInt8Matmul(torch.autograd.Function):
    """y = x @ dequant(W).T + bias for x [tokens, in]; gradients for x (and a trainable bias)."""

    @staticmethod
    def forward(ctx, x2d, w_int8, w_scale, bias):
        y = weight_only_matmul(x2d, w_int8, w_scale)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(w_int8, w_scale)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        w_int8, w_scale = ctx.saved_tensors
        grad_x = int8_matmul_grad_input(grad_y, w_int8, w_scale) if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias


class Int8Embedding(nn.Embedding):
    """A frozen embedding table in row-wise int8.

    State: ``weight`` (int8 [num_embeddings, dim], a frozen Parameter) and ``weight_scale``
    (float32 [num_embeddings] buffer, each row's absmax), the keys Int8Linear uses. The lookup
    returns ``output_dtype`` (the float embedding's dtype; ``model.to(dtype)`` changes it).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        # nn.Embedding.__init__ would allocate and initialize a float table we never use.
        nn.Module.__init__(self)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self.weight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        self.output_dtype = dtype

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        if isinstance(embedding, Int8Embedding):
            raise TypeError("the embedding is already an Int8Embedding")
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"expected nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None:
            raise ValueError("an embedding with max_norm renormalizes its rows on lookup; it cannot be frozen in int8")
        weight = embedding.weight
        layer = cls(weight.shape[0], weight.shape[1], embedding.padding_idx, dtype=weight.dtype, device=weight.device)
        layer.weight.data, layer.weight_scale = quantize_rows_in_slabs(weight.detach())
        layer.train(embedding.training)
        return layer

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor, where: str = "the checkpoint") -> None:
        """Quantize a float table read from a checkpoint into this allocated embedding as the
        one-process path does (cast to the lookup's dtype first, then row-wise int8)."""
        _load_table(self, weight, self.output_dtype, self.weight_scale, where)

    @torch.no_grad()
    def load_from_checkpoint(self, read: Callable[[str], torch.Tensor], where: str) -> list[torch.Tensor]:
        """Fill this allocated embedding from the float table ``read("weight")``; returns the
        tensors filled (a head tied to it shares them)."""
        self.load_float_weight(read("weight"), where=where.format("weight"))
        return [self.weight, self.weight_scale]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embedding_lookup(input_ids, self.weight, self.weight_scale, self.output_dtype)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * (self.weight_scale / INT8_MAX)[:, None]).to(dtype)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) would cast the float32 scales (kept exact, as in FrozenQuantLinear) and
        # must instead change the lookup's output dtype: learn the new dtype from an empty probe.
        scale = self.weight_scale
        self.output_dtype = fn(torch.empty(0, dtype=self.output_dtype)).dtype
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, output_dtype={self.output_dtype}, int8 rows"


class Int8Head(FrozenQuantLinear):
    """A frozen output head: weight-only int8 matmul (float activations x int8 rows).

    Same state as Int8Linear (``weight`` int8 [vocab, hidden], ``weight_scale`` float32 [vocab],
    optional ``bias``). Built tied (:meth:`tied_to`) it shares the embedding's Parameter and reads
    the embedding's scales (:attr:`row_scale`) instead of holding a buffer: a buffer would be
    copied per module by every ``model.to(device)``, a Parameter is moved in place and stays one.
    """

    _tied_embedding: tuple = ()  # (Int8Embedding,) when tied; a tuple so it is not a submodule
    # The dtype a checkpoint's float table is cast to before quantizing it (load_float_weight);
    # None: the dtype it is read in. Set by untied_copy: the tied embedding's dtype.
    source_dtype: torch.dtype | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 bias_dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, code_shape=(out_features, in_features),
                         code_dtype=torch.int8, scale_shape=(out_features,), device=device, bias_dtype=bias_dtype)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Head":
        if isinstance(linear, FrozenQuantLinear) or not isinstance(linear, nn.Linear):
            raise TypeError(f"expected a float nn.Linear head, got {type(linear).__name__}")
        bias = linear.bias
        layer = cls(linear.in_features, linear.out_features, bias=bias is not None, device=linear.weight.device,
                    bias_dtype=None if bias is None else bias.dtype)
        layer.set_weight(linear.weight)
        if bias is not None:
            layer.bias.copy_(bias)
        layer.train(linear.training)
        return layer

    @classmethod
    def tied_to(cls, embedding: Int8Embedding, bias: torch.Tensor | None = None) -> "Int8Head":
        """A head sharing ``embedding``'s int8 Parameter and scale tensor (no copy)."""
        layer = cls(embedding.embedding_dim, embedding.num_embeddings, bias=bias is not None, device="meta",
                    bias_dtype=None if bias is None else bias.dtype)
        layer.weight = embedding.weight
        del layer.weight_scale
        layer._tied_embedding = (embedding,)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        layer.train(embedding.training)
        return layer

    def untied_copy(self) -> "Int8Head":
        """This tied head as an untied Int8Head of its own, for a process that holds the head but
        not the embedding (a pipeline's last stage): the same codes (the same Parameter, or the
        meta tensor to be filled) and the same scales, filled from the table the checkpoint
        stores under the embedding's name and quantized as the embedding would be."""
        if not self.tied:
            raise ValueError("the head is not tied to an embedding")
        embedding = self._tied_embedding[0]
        untied = Int8Head(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                          bias_dtype=None if self.bias is None else self.bias.dtype)
        if self.bias is not None:
            untied.bias = self.bias
        if self.weight.device.type != "meta":  # a model drawn from its config: the codes are real already
            untied.weight = self.weight
            untied.weight_scale = embedding.weight_scale
        untied.source_dtype = embedding.output_dtype
        untied.train(self.training)
        return untied

    @property
    def tied(self) -> bool:
        return bool(self._tied_embedding)

    @property
    def row_scale(self) -> torch.Tensor:
        """float32 [vocab] row absmax: this layer's buffer, or the tied embedding's."""
        return self._tied_embedding[0].weight_scale if self.tied else self.weight_scale

    def _apply(self, fn, recurse=True):
        if self.tied:  # no scale buffer of its own; the embedding keeps its scales float32
            return nn.Module._apply(self, fn, recurse)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        if self.tied:
            raise ValueError("a tied Int8Head shares the embedding's table: quantize the embedding instead")
        self._check_float_weight(weight)
        w_int8, w_scale = quantize_rows_in_slabs(weight.detach())
        self.weight = nn.Parameter(w_int8, requires_grad=False)
        self.weight_scale = w_scale

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor, where: str = "the checkpoint") -> None:
        """Quantize a float table read from a checkpoint into this allocated head (or, tied, into
        the embedding whose table it shares), cast to :attr:`source_dtype` first when set."""
        if self.tied:
            self._tied_embedding[0].load_float_weight(weight, where)
        else:
            _load_table(self, weight, self.source_dtype or weight.dtype, self.weight_scale, where)

    @torch.no_grad()
    def load_from_checkpoint(self, read: Callable[[str], torch.Tensor], where: str) -> list[torch.Tensor]:
        """Fill this allocated head from the float table ``read("weight")``; returns the tensors
        filled. A tied head fills nothing of its own: its embedding fills the shared table."""
        if self.tied:
            return []
        self.load_float_weight(read("weight"), where=where.format("weight"))
        return [self.weight, self.weight_scale]

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * (self.row_scale / INT8_MAX)[:, None]).to(dtype)

    def _matmul(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        device_type = x2d.device.type
        if torch.is_autocast_enabled(device_type):
            # As nn.Linear under autocast: the product (the logits) in the autocast dtype. Autocast
            # is then switched off so the op's own float32 accumulation is not recast.
            x2d = x2d.to(torch.get_autocast_dtype(device_type))
            bias = None if bias is None else bias.to(x2d.dtype)
        with torch.autocast(device_type, enabled=False):
            return WeightOnlyInt8Matmul.apply(x2d, self.weight, self.row_scale, bias)


@torch.no_grad()
def _load_table(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor, where: str) -> None:
    """Quantize a float vocabulary table, cast to ``dtype``, into ``module``'s allocated codes (the
    rows this rank holds, all unless FSDP2 sharded them) and every row's ``scale``."""
    if tuple(weight.shape) != tuple(module.weight.shape):
        raise ValueError(f"{where} has shape {tuple(weight.shape)}, the model expects {list(module.weight.shape)}")
    codes, scales = quantize_rows_in_slabs(weight.to(device=scale.device, dtype=dtype))
    start, end = local_rows(module.weight)
    local_tensor(module.weight).copy_(codes[start:end])
    scale.copy_(scales)


def _is_tied(head: nn.Module | None, embedding: nn.Module) -> bool:
    return head is not None and getattr(head, "weight", None) is embedding.weight


@torch.no_grad()
def quantize_embeddings(model: nn.Module) -> dict[str, int]:
    """Replace, in place, a transformers model's word embeddings by an Int8Embedding and its
    output head (``get_output_embeddings``) by an Int8Head; a tied head shares the int8 table.

    Returns ``{"embedding_bytes": ..., "head_bytes": ...}``: the int8 codes plus float32 scales
    now held (head_bytes is 0 when tied: the table is counted once). Frozen: train adapters on
    the blocks. Call it before ``get_peft_model`` (PEFT's "all-linear" never targets the head).
    """
    if not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"quantize_embeddings needs a transformers model (get_input_embeddings), got {type(model).__name__}")
    embedding = model.get_input_embeddings()
    if isinstance(embedding, Int8Embedding):
        raise ValueError("the model's embeddings are int8 already")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = _is_tied(head, embedding)
    int8_embedding = Int8Embedding.from_embedding(embedding)
    model.set_input_embeddings(int8_embedding)
    head_bytes = 0
    if head is not None:
        if not isinstance(head, nn.Linear) or isinstance(head, FrozenQuantLinear):
            raise TypeError(f"the output head is a {type(head).__name__}: only a float nn.Linear head can be quantized")
        if tied:
            int8_head = Int8Head.tied_to(int8_embedding, bias=head.bias)
        else:
            int8_head = Int8Head.from_linear(head)
            head_bytes = int8_head.weight.numel() + 4 * int8_head.weight_scale.numel()
        model.set_output_embeddings(int8_head)
    del embedding, head  # the float tables go now: peak = float tables + one int8 copy
    copy_out_of_file_mappings(model)  # and the checkpoint's mapping with them
    return {"embedding_bytes": int8_embedding.weight.numel() + 4 * int8_embedding.weight_scale.numel(),
            "head_bytes": head_bytes}


@torch.no_grad()
def dequantize_embeddings(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Inverse of :func:`quantize_embeddings` (up to the rounding): float nn.Embedding and
    nn.Linear head in ``dtype``, tied again if they were."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, Int8Embedding):
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    float_embedding = nn.Embedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                                   device="meta", dtype=dtype)
    float_embedding.weight = nn.Parameter(embedding.dequantized_weight(dtype), requires_grad=False)
    float_embedding.train(embedding.training)
    model.set_input_embeddings(float_embedding)
    if isinstance(head, Int8Head):
        float_head = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta", dtype=dtype)
        if _is_tied(head, embedding):
            float_head.weight = float_embedding.weight
        else:
            float_head.weight = nn.Parameter(head.dequantized_weight(dtype), requires_grad=False)
        if head.bias is not None:
            float_head.bias = nn.Parameter(head.bias.detach().to(dtype), requires_grad=False)
        float_head.train(head.training)
        model.set_output_embeddings(float_head)
    return model
