"""Row-wise int8 quantization: ``quantize_rowwise`` (weights [N, K]) and ``quantize_tokenwise``
(activations [M, K], outlier columns left out of the absmax and coded 0), one Triton kernel for both.

``code = round_half_to_even(127 * value / absmax)`` in float32; the scale kept is the absmax.
"""

from __future__ import annotations

import torch

from bytetune.kernels import _ops
from bytetune.kernels.constants import INT8_MAX
from bytetune.kernels.dispatch import HAS_TRITON, launch_device
from bytetune.kernels.llm_int8.common import _check_float_2d, _safe_absmax

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.dispatch import abs_bits, float_from_bits
    from bytetune.kernels.llm_int8.common import _round_half_to_even


def _check_outlier_cols(outlier_cols: torch.Tensor | None, k: int) -> None:
    if outlier_cols is None:
        return
    is_mask = outlier_cols.dtype == torch.bool and outlier_cols.shape == (k,)
    is_indices = outlier_cols.dim() == 1 and outlier_cols.dtype in (torch.int64, torch.int32)
    if not (is_mask or is_indices):
        raise ValueError(
            f"outlier_cols must be a 1-D tensor of column indices (int64) or a bool mask of the "
            f"{k} columns, got shape {tuple(outlier_cols.shape)} dtype {outlier_cols.dtype}; use "
            "outlier_columns(x, threshold) or select_outlier_columns(x, threshold, capacity)"
        )


def _quantize_with_scale(
    values: torch.Tensor, scale: torch.Tensor, zero_cols: torch.Tensor | None = None, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    # Multiply first, then divide: the Triton kernels use the same order, so the codes agree
    # bit for bit (torch.round is round-half-to-even). One fp32 buffer updated in place (``buffer``
    # when the caller has a spare one): on CPU, fresh [M, K] buffers cost more than the arithmetic.
    # zero_cols (column indices) get code 0: zeroed in that buffer, not in a copy of the input.
    # No clamp to +-127 (one pass fewer over [M, K]): every value left is at most its row's
    # absmax, and fl(fl(127 * v) / absmax) <= 127 * (1 + 2**-24)**2 < 127.5 rounds to <= 127.
    # (Only finite values above 2.6e36, where 127 * v overflows, would escape that bound.)
    codes = values.float() * INT8_MAX if buffer is None else torch.mul(values, INT8_MAX, out=buffer)
    if zero_cols is not None:
        codes.index_fill_(1, zero_cols, 0)
    return codes.div_(scale[:, None]).round_().to(torch.int8)


def _quantize_rows_given_abs(
    x: torch.Tensor, abs_x: torch.Tensor, zero_cols: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise codes and scales of x, from ``abs_x`` = |x| with ``zero_cols`` already zeroed.
    abs_x is used up: a float32 one becomes the codes' buffer."""
    x_scale = _safe_absmax(abs_x.amax(dim=1).float())
    buffer = abs_x if abs_x.dtype == torch.float32 else None
    return _quantize_with_scale(x, x_scale, zero_cols, buffer), x_scale


def quantize_rowwise_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float_2d("w", w)
    w_scale = _safe_absmax(w.abs().amax(dim=1).float())
    return _quantize_with_scale(w, w_scale), w_scale


def quantize_tokenwise_reference(
    x: torch.Tensor, outlier_cols: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float_2d("x", x)
    _check_outlier_cols(outlier_cols, x.shape[1])
    if outlier_cols is not None and outlier_cols.dtype == torch.bool:
        # masked_fill, not x[:, mask]: boolean indexing would call nonzero (a host sync on CUDA).
        x = x.masked_fill(outlier_cols[None, :], 0)
        outlier_cols = None
    elif outlier_cols is not None and outlier_cols.numel() == 0:
        outlier_cols = None
    abs_x = x.abs()
    if outlier_cols is not None:
        outlier_cols = outlier_cols.long()
        abs_x.index_fill_(1, outlier_cols, 0)
    return _quantize_rows_given_abs(x, abs_x, outlier_cols)


# The row quantizer's K tile: the next power of two of K, capped (the largest the gate checks).
QUANTIZE_ROWS_BLOCK_K = (1024,)


if HAS_TRITON:

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr,
        codes_ptr,
        scale_ptr,
        is_outlier_ptr,
        K,
        stride_xm,
        stride_xk,
        HAS_OUTLIERS: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One program per row: pass 1 finds the absmax (outlier columns excluded), pass 2 writes
        # the codes. The second read of the row mostly hits L2. The absmax keeps NaN (abs_bits):
        # a NaN activation gives its row a NaN scale, hence NaN outputs, as the reference does.
        # Its codes are left unspecified.
        row = tl.program_id(0).to(tl.int64)
        x_row_ptr = x_ptr + row * stride_xm
        block_absmax = tl.zeros([BLOCK_K], dtype=tl.int32)
        for k_start in range(0, K, BLOCK_K):
            cols = k_start + tl.arange(0, BLOCK_K)
            in_row = cols < K
            # int64 column offsets: a column-major x has stride_xk = M, and K * M passes 2^31.
            magnitude = abs_bits(tl.load(x_row_ptr + cols.to(tl.int64) * stride_xk, mask=in_row, other=0.0).to(tl.float32))
            if HAS_OUTLIERS:
                is_outlier = tl.load(is_outlier_ptr + cols, mask=in_row, other=0) != 0
                magnitude = tl.where(is_outlier, 0, magnitude)
            block_absmax = tl.maximum(block_absmax, magnitude)
        scale = float_from_bits(tl.max(block_absmax, axis=0))
        scale = tl.where(scale == 0.0, 1.0, scale)
        tl.store(scale_ptr + row, scale)

        for k_start in range(0, K, BLOCK_K):
            cols = k_start + tl.arange(0, BLOCK_K)
            in_row = cols < K
            value = tl.load(x_row_ptr + cols.to(tl.int64) * stride_xk, mask=in_row, other=0.0).to(tl.float32)
            # div_rn: IEEE division, so the codes equal torch's bit for bit on the GPU too.
            code = _round_half_to_even(tl.div_rn(value * 127.0, scale))
            code = tl.minimum(tl.maximum(code, -127.0), 127.0)
            if HAS_OUTLIERS:
                is_outlier = tl.load(is_outlier_ptr + cols, mask=in_row, other=0) != 0
                code = tl.where(is_outlier, 0.0, code)
            tl.store(codes_ptr + row * K + cols, code.to(tl.int8), mask=in_row)


def _launch_quantize_rows(x: torch.Tensor, is_outlier: torch.Tensor | None):
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scale
    block_k = min(triton.next_power_of_2(max(k, 1)), QUANTIZE_ROWS_BLOCK_K[-1] if x.is_cuda else 128)
    with launch_device(x):
        _quantize_rows_kernel[(m,)](
            x,
            codes,
            scale,
            is_outlier if is_outlier is not None else codes,  # unread when HAS_OUTLIERS is False
            k,
            x.stride(0),
            x.stride(1),
            HAS_OUTLIERS=is_outlier is not None,
            BLOCK_K=block_k,
        )
    return codes, scale


def quantize_rowwise_triton(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float_2d("w", w)
    return _launch_quantize_rows(w, None)


def quantize_tokenwise_triton(
    x: torch.Tensor, outlier_cols: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float_2d("x", x)
    _check_outlier_cols(outlier_cols, x.shape[1])
    is_outlier = None
    if outlier_cols is not None and outlier_cols.dtype == torch.bool:
        is_outlier = outlier_cols.to(torch.int8)
    elif outlier_cols is not None and outlier_cols.numel() > 0:
        is_outlier = torch.zeros(x.shape[1], dtype=torch.int8, device=x.device)
        is_outlier[outlier_cols] = 1
    return _launch_quantize_rows(x, is_outlier)


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] float -> (int8 codes [N, K], float32 row absmax [N]; 1.0 for all-zero rows)."""
    return _ops.quantize_rowwise(w)


def quantize_tokenwise(
    x: torch.Tensor, outlier_cols: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (int8 codes [M, K], float32 row absmax [M]).

    The absmax of each row ignores ``outlier_cols`` (column indices, or a bool mask [K]) and
    their codes are 0: those columns take the 16-bit path in the layer.
    """
    return _ops.quantize_tokenwise(x, outlier_cols)
