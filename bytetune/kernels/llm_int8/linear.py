"""``int8_linear``: the LLM.int8() layer forward (outlier columns in 16 bits, the rest through
the int8 GEMM), composed of the other ops; its backward is ``int8_matmul_grad_input``."""

from __future__ import annotations

import torch

from bytetune.kernels import _ops
from bytetune.kernels.constants import INT8_MAX
from bytetune.kernels.llm_int8.common import _check_float_2d
from bytetune.kernels.llm_int8.matmul import int8_matmul, int8_matmul_reference
from bytetune.kernels.llm_int8.outliers import select_outlier_columns
from bytetune.kernels.llm_int8.quantize_rows import _quantize_rows_given_abs, quantize_tokenwise


def _dequantized_columns(w_int8: torch.Tensor, w_scale: torch.Tensor, cols: torch.Tensor, dtype) -> torch.Tensor:
    """The weight's columns ``cols`` dequantized, [N, len(cols)] in ``dtype``."""
    return (w_int8.index_select(1, cols).float() * (w_scale / INT8_MAX).unsqueeze(1)).to(dtype)


def int8_linear_reference(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_capacity: int,
) -> torch.Tensor:
    """The whole LLM.int8() layer forward in plain PyTorch (the CPU path of the layer op).

    Same outlier columns as :func:`select_outlier_columns` (at most ``outlier_capacity``, those
    of largest absmax, among the columns reaching ``threshold``), same codes and int8 GEMM as the
    GPU path; the 16-bit product takes only the marked columns. Their count depends on the data,
    which a CPU reads for free (there is no device to wait for), so the fixed-capacity padding
    the GPU path multiplies (64 of SmolLM2's 576 columns, most layers having none that reach
    the threshold) is never computed. One |x| buffer serves both the column absmax (the outlier
    search) and the row absmax (the token scales).
    """
    _check_float_2d("x", x)
    if outlier_capacity < 0:
        raise ValueError(f"capacity must be >= 0 columns, got {outlier_capacity}")
    m, k = x.shape
    abs_x = x.abs()
    outliers = None
    capacity = min(outlier_capacity, k) if threshold > 0 and m > 0 else 0
    if capacity > 0:
        top_absmax, top_cols = torch.topk(abs_x.amax(dim=0).float(), capacity, sorted=False)
        marked = top_cols[top_absmax >= threshold]
        if marked.numel() > 0:
            outliers = torch.sort(marked).values  # ascending, as the GPU path sums them
            abs_x.index_fill_(1, outliers, 0)
    x_int8, x_scale = _quantize_rows_given_abs(x, abs_x, outliers)
    y = int8_matmul_reference(x_int8, w_int8, x_scale, w_scale, bias, out_dtype=x.dtype)
    if outliers is None:
        return y
    # Accumulated into y (a fresh tensor): no second [M, N] temporary at the layer's peak.
    return y.addmm_(x.index_select(1, outliers), _dequantized_columns(w_int8, w_scale, outliers, x.dtype).t())


def int8_linear_fixed_capacity(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_capacity: int,
) -> torch.Tensor:
    """LLM.int8()'s layer forward from the public ops, with shapes fixed in advance (the GPU
    path: nothing waits for the device, so it can be captured in a CUDA graph).

    The outlier product always runs over ``min(outlier_capacity, K)`` columns
    (:func:`select_outlier_columns`); the padding ones among them are zeroed, with where, not a
    product, so that an inf there cannot make a NaN.
    """
    cols, is_outlier = select_outlier_columns(x, threshold, outlier_capacity)
    x_int8, x_scale = quantize_tokenwise(x, is_outlier if cols.numel() > 0 else None)
    y = int8_matmul(x_int8, w_int8, x_scale, w_scale, bias=bias, out_dtype=x.dtype)
    if cols.numel() == 0:
        return y
    x_outlier = torch.where(is_outlier.index_select(0, cols).unsqueeze(0), x.index_select(1, cols), 0)
    return y.addmm_(x_outlier, _dequantized_columns(w_int8, w_scale, cols, x.dtype).t())


def int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    outlier_capacity: int,
) -> torch.Tensor:
    """x [M, K] @ dequant(w_int8).T + bias in x's dtype, with LLM.int8()'s outlier decomposition:
    columns of x with absmax >= ``threshold`` (at most ``outlier_capacity`` of them, those of
    largest absmax: see :func:`select_outlier_columns`) multiply the dequantized weight columns
    in x's dtype; the rest go through the int8 GEMM.

    Differentiable in x and bias (straight-through: grad_x = grad_y @ dequant(w_int8)). GPU
    tensors take :func:`int8_linear_fixed_capacity` (Triton kernels, no host sync); CPU tensors
    :func:`int8_linear_reference` (the same result, without the padding columns).
    """
    return _ops.int8_linear(x, w_int8, w_scale, bias, threshold, outlier_capacity)
