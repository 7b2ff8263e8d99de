"""LLM.int8()'s outlier columns: ``column_absmax`` (one Triton kernel), ``outlier_columns``
(data-dependent length) and ``select_outlier_columns`` (fixed shapes, what the layers use)."""

from __future__ import annotations

import torch

from bytetune.kernels import _ops
from bytetune.kernels.dispatch import HAS_TRITON, launch_device
from bytetune.kernels.gpu_arch import tile
from bytetune.kernels.llm_int8.common import _check_float_2d, _launch_kwargs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.dispatch import abs_bits, float_from_bits


def column_absmax_reference(x: torch.Tensor) -> torch.Tensor:
    _check_float_2d("x", x)
    if x.shape[0] == 0:
        return torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    # float32, so that a threshold not representable in bf16/fp16 is not rounded when compared.
    return x.abs().amax(dim=0).float()


def outlier_columns_reference(x: torch.Tensor, threshold: float) -> torch.Tensor:
    _check_float_2d("x", x)
    if threshold <= 0 or x.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return torch.nonzero(column_absmax_reference(x) >= threshold).flatten()


COLUMN_ABSMAX_TILE = tile(ROWS_PER_PROGRAM=256, BLOCK_M=32, BLOCK_K=128)


_INTERPRETER_COLUMN_ABSMAX_TILE = tile(ROWS_PER_PROGRAM=64, BLOCK_M=16, BLOCK_K=64)


if HAS_TRITON:

    @triton.jit
    def _column_absmax_kernel(
        x_ptr,
        partial_ptr,
        M,
        K,
        stride_xm,
        stride_xk,
        ROWS_PER_PROGRAM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # Grid (column blocks, row chunks): each program reduces ROWS_PER_PROGRAM rows of a
        # column block into one row of partial maxima, so thousands of tokens still fill the GPU.
        # The maxima keep NaN (abs_bits): a NaN column's absmax is NaN, as in the reference.
        pid_k = tl.program_id(0)
        pid_rows = tl.program_id(1).to(tl.int64)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        # int64 column offsets: a column-major x has stride_xk = M, and K * M passes 2^31.
        col_offsets = cols.to(tl.int64) * stride_xk
        column_absmax = tl.zeros([BLOCK_K], dtype=tl.int32)
        for m_start in range(0, ROWS_PER_PROGRAM, BLOCK_M):
            rows = pid_rows * ROWS_PER_PROGRAM + m_start + tl.arange(0, BLOCK_M)
            tile = tl.load(
                x_ptr + rows[:, None] * stride_xm + col_offsets[None, :],
                mask=(rows[:, None] < M) & col_ok[None, :],
                other=0.0,
            )
            column_absmax = tl.maximum(column_absmax, tl.max(abs_bits(tile.to(tl.float32)), axis=0))
        tl.store(partial_ptr + pid_rows * K + cols, float_from_bits(column_absmax), mask=col_ok)


def column_absmax_triton(x: torch.Tensor) -> torch.Tensor:
    _check_float_2d("x", x)
    m, k = x.shape
    if m == 0 or k == 0:
        return torch.zeros(k, dtype=torch.float32, device=x.device)
    tiles = COLUMN_ABSMAX_TILE if x.is_cuda else _INTERPRETER_COLUMN_ABSMAX_TILE
    row_chunks = triton.cdiv(m, tiles["ROWS_PER_PROGRAM"])
    # Every (row chunk, column) entry is written by the kernel: no need to zero it first.
    partial = torch.empty(row_chunks, k, dtype=torch.float32, device=x.device)
    with launch_device(x):
        _column_absmax_kernel[(triton.cdiv(k, tiles["BLOCK_K"]), row_chunks)](
            x, partial, m, k, x.stride(0), x.stride(1), **_launch_kwargs(tiles)
        )
    return partial.amax(dim=0)


def outlier_columns_triton(x: torch.Tensor, threshold: float) -> torch.Tensor:
    _check_float_2d("x", x)
    if threshold <= 0 or x.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return torch.nonzero(column_absmax_triton(x) >= threshold).flatten()


def column_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each column of x [M, K], float32 [K] (zeros when M = 0)."""
    return _ops.column_absmax(x)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted unique indices of the columns of x [M, K] holding any |x| >= threshold.

    ``threshold <= 0`` turns the outlier decomposition off: the result is empty. The result's
    length depends on the data, so this op waits for the device (``nonzero``); the layers use
    :func:`select_outlier_columns` instead.
    """
    return _ops.outlier_columns(x, threshold)


def select_outlier_columns(
    x: torch.Tensor, threshold: float, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8()'s outlier columns with shapes fixed in advance, so nothing waits for the device.

    Returns ``(cols, is_outlier)``: ``cols`` int64 [C], C = min(capacity, K) (0 when
    ``threshold <= 0`` or x has no rows), the ascending indices of the C columns of largest
    absmax; ``is_outlier`` bool [K] marks those of them whose absmax is >= threshold.

    Contract: when at most C columns reach the threshold, ``is_outlier`` marks exactly
    :func:`outlier_columns`' set. When more do, it marks the C of largest absmax (ties broken
    arbitrarily) -- LLM.int8() with the threshold raised to the C-th largest column absmax; the
    other columns stay in the int8 part. Entries of ``cols`` not marked in ``is_outlier`` are
    padding: the caller must zero their contribution.
    """
    _check_float_2d("x", x)
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0 columns, got {capacity}")
    m, k = x.shape
    c = min(capacity, k) if threshold > 0 and m > 0 else 0
    is_outlier = torch.zeros(k, dtype=torch.bool, device=x.device)
    if c == 0:
        return torch.empty(0, dtype=torch.long, device=x.device), is_outlier
    top_absmax, top_cols = torch.topk(column_absmax(x), c, sorted=False)
    is_outlier.scatter_(0, top_cols, top_absmax >= threshold)
    # Ascending, as outlier_columns returns them: the 16-bit product then sums in the same order.
    return torch.sort(top_cols).values, is_outlier
