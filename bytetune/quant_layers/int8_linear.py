"""LLM.int8() linear layer: frozen int8 weight, per-row scales, 16-bit outlier columns.

Forward (arXiv 2208.07339): activation columns holding any |x| >= ``threshold`` are outliers; they
stay in the activation dtype and multiply the matching dequantized weight columns. Every other
column is quantized per token and goes through the int8 x int8 -> int32 GEMM. The two parts are
summed. ``threshold=0`` is pure vector-wise quantization (no outlier columns).

Backward: the input gradient only (the weight is frozen), computed by the kernel op that never
materializes the 16-bit weight. The straight-through rule is used: quantizing the activations is
treated as identity, so grad_x = grad_y @ dequant(W).
"""

from __future__ import annotations

import torch
from torch import nn

from bytetune.kernels.llm_int8 import (
    INT8_MAX,
    int8_matmul,
    int8_matmul_grad_input,
    outlier_columns,
    quantize_rowwise,
    quantize_tokenwise,
)
from bytetune.quant_layers.frozen_linear import FrozenQuantLinear

DEFAULT_THRESHOLD = 6.0


def dequantize_rowwise(w_int8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code * absmax / 127 per row (the kernels' convention), computed in float32, cast to dtype."""
    return (w_int8.float() * (w_scale.float() / INT8_MAX)[:, None]).to(dtype)


class Int8MatmulFunction(torch.autograd.Function):
    """y = x @ dequant(W).T + bias, with LLM.int8()'s outlier decomposition; x is 2-D."""

    @staticmethod
    def forward(ctx, x2d, w_int8, w_scale, bias, threshold):
        outliers = outlier_columns(x2d, threshold)
        x_int8, x_scale = quantize_tokenwise(x2d, outliers)
        y = int8_matmul(x_int8, w_int8, x_scale, w_scale, bias=bias, out_dtype=x2d.dtype)
        if outliers.numel() > 0:
            # Few columns (a handful per layer in practice): dequantizing just them is cheap.
            w_outlier = dequantize_rowwise(w_int8[:, outliers], w_scale, dtype=x2d.dtype)
            y = y + x2d[:, outliers] @ w_outlier.t()
        ctx.save_for_backward(w_int8, w_scale)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        w_int8, w_scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = int8_matmul_grad_input(grad_y, w_int8, w_scale)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.sum(0)
        return grad_x, None, None, grad_bias, None


class Int8Linear(FrozenQuantLinear):
    """A frozen LLM.int8() linear layer.

    State: ``weight`` (int8 [out, in], a frozen Parameter so that PEFT and transformers see a
    Linear), ``weight_scale`` (float32 [out] buffer: each row's absmax) and an optional ``bias``.
    ``threshold`` is not state: it is a forward-time choice.
    """

    # True when built in place of transformers' Conv1D, whose checkpoints store weights [in, out].
    source_is_conv1d = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        device=None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            code_shape=(out_features, in_features),
            code_dtype=torch.int8,
            scale_shape=(out_features,),
            device=device,
            bias_dtype=bias_dtype,
        )
        self.threshold = float(threshold)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> "Int8Linear":
        """Quantize an nn.Linear (or transformers' Conv1D, whose weight is stored [in, out])."""
        weight = _linear_weight(linear)
        out_features, in_features = weight.shape
        bias = getattr(linear, "bias", None)
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            threshold=threshold,
            device=weight.device,
            bias_dtype=None if bias is None else bias.dtype,
        )
        layer.set_weight(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float [out, in] weight into this layer's int8 weight and scales."""
        self._check_float_weight(weight)
        w_int8, w_scale = quantize_rowwise(weight.float())
        self.weight.data = w_int8.to(self.weight.device)
        self.weight_scale = w_scale.to(self.weight.device, torch.float32)

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float [out, in] weight the int8 weight stands for."""
        return dequantize_rowwise(self.weight, self.weight_scale, dtype=dtype)

    def _matmul(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return Int8MatmulFunction.apply(x2d, self.weight, self.weight_scale, bias, self.threshold)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}"
        )


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or of transformers' Conv1D ([in, out])."""
    if isinstance(module, Int8Linear):
        raise TypeError("the layer is already an Int8Linear")
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)
