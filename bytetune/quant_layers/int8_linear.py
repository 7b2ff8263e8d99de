"""LLM.int8() linear layer: frozen int8 weight, per-row scales, 16-bit outlier columns.

Forward (arXiv 2208.07339): activation columns holding any |x| >= ``threshold`` are outliers; they
stay in the activation dtype and multiply the matching dequantized weight columns. Every other
column is quantized per token and goes through the int8 x int8 -> int32 GEMM. The two parts are
summed. ``threshold=0`` is pure vector-wise quantization (no outlier columns).

The outlier columns are found on the device with fixed shapes (no host sync, CUDA-graph and
torch.compile friendly): up to ``outlier_capacity`` of them per forward, those of largest absmax.
When more columns than that reach the threshold, the rest stay in the int8 part, as if the
threshold were raised for that batch (``bytetune.kernels.llm_int8.select_outlier_columns``).
``outlier_capacity >= in_features`` always reproduces LLM.int8() exactly.

Under ``torch.autocast`` the input is cast to the autocast dtype first, like nn.Linear.

Backward: the input gradient only (the weight is frozen), computed by the kernel op that never
materializes the 16-bit weight. The straight-through rule is used: quantizing the activations is
treated as identity, so grad_x = grad_y @ dequant(W).
"""

from __future__ import annotations

import torch
from torch import nn

from bytetune.kernels.constants import INT8_MAX
from bytetune.kernels.llm_int8 import int8_linear, quantize_rowwise
from bytetune.quant_layers.frozen_linear import FrozenQuantLinear

DEFAULT_THRESHOLD = 6.0
# At most this fraction of the input columns take the 16-bit path per forward by default, and
# never fewer than MIN_OUTLIER_CAPACITY columns. The 16-bit product runs over all of them whether
# or not they reach the threshold (fixed shapes): 1/32 of the int8 GEMM's multiply-adds for
# in_features >= 2048, more below that (64 of 576 columns for SmolLM2: 11 %).
OUTLIER_CAPACITY_FRACTION = 1 / 32
MIN_OUTLIER_CAPACITY = 64


def default_outlier_capacity(in_features: int) -> int:
    """How many outlier columns a forward can take in 16 bits when the layer does not say."""
    return min(in_features, max(MIN_OUTLIER_CAPACITY, int(in_features * OUTLIER_CAPACITY_FRACTION)))


def dequantize_rowwise(w_int8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code * absmax / 127 per row (the kernels' convention), computed in float32, cast to dtype."""
    return (w_int8.float() * (w_scale.float() / INT8_MAX)[:, None]).to(dtype)


class Int8Linear(FrozenQuantLinear):
    """A frozen LLM.int8() linear layer.

    State: ``weight`` (int8 [out, in], a frozen Parameter so that PEFT and transformers see a
    Linear), ``weight_scale`` (float32 [out] buffer: each row's absmax) and an optional ``bias``.
    ``threshold`` and ``outlier_capacity`` (most outlier columns per forward; default
    :func:`default_outlier_capacity`) are not state: they are forward-time choices.
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
        outlier_capacity: int | None = None,
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
        self.outlier_capacity = default_outlier_capacity(in_features) if outlier_capacity is None else outlier_capacity
        if self.outlier_capacity < 0:
            raise ValueError(f"outlier_capacity must be >= 0 columns, got {outlier_capacity}")

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Module, threshold: float = DEFAULT_THRESHOLD, outlier_capacity: int | None = None
    ) -> "Int8Linear":
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
            outlier_capacity=outlier_capacity,
        )
        layer.set_weight(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        # dequantizing gives the Conv1D back, so that an export loads into the same architecture
        layer.source_is_conv1d = is_conv1d(linear)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float [out, in] weight into this layer's int8 weight and scales."""
        self._check_float_weight(weight)
        w_int8, w_scale = quantize_rowwise(weight.float())
        self.weight.data = w_int8.to(self.weight.device)
        self.weight_scale = w_scale.to(self.weight.device, torch.float32)

    def _as_out_in(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape[::-1] if self.source_is_conv1d else shape

    @torch.no_grad()
    def quantize_checkpoint_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [out, in], float32 row absmax [out]) of a float weight laid out as the
        checkpoint stores it for this layer ([in, out] for a Conv1D), in the dtype it was read
        in: how every checkpoint loader (transformers' quantizer, the FSDP and pipeline loader)
        quantizes, so that all of them give the same codes."""
        if self.source_is_conv1d:
            weight = weight.t()
        return quantize_rowwise(weight.contiguous())

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float [out, in] weight the int8 weight stands for."""
        return dequantize_rowwise(self.weight, self.weight_scale, dtype=dtype)

    def _matmul(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_linear(x2d, self.weight, self.weight_scale, bias, self.threshold, self.outlier_capacity)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}, "
            f"outlier_capacity={self.outlier_capacity}"
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
