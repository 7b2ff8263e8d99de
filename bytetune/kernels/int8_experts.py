"""LLM.int8() over mixture-of-experts weights: one grouped int8 GEMM over every expert.

The tokens routed to the experts arrive sorted by expert (``x [T, K]``, expert ``e`` owning rows
``offsets[e]:offsets[e + 1]``); the expert weights are stacked codes ``w_int8 [E, N, K]`` (each
expert's [N, K] in nn.Linear's layout, quantized per output row) with float32 row absmax
``w_scale [E, N]``. Per expert, as Int8Linear does per layer (arXiv 2208.07339): the columns of
that expert's tokens holding any |x| >= ``threshold`` (at most ``outlier_capacity`` of them, those
of largest absmax) stay in x's dtype and multiply the matching dequantized weight columns; the
rest is quantized per token and goes through int8 x int8 -> int32. ``threshold <= 0`` turns the
outlier decomposition off. The codes follow :mod:`bytetune.kernels.llm_int8`'s convention
(``value ~= code * absmax / 127``) and reuse its quantizers.

Two implementations of each op, registered per device by :mod:`bytetune.kernels.backends`:

- ``*_reference``: a loop over the experts that hold tokens, each one the dense LLM.int8() layer of
  :mod:`bytetune.kernels.llm_int8` (the CPU's exact int8 GEMM, ``torch._int_mm`` where the probe in
  :mod:`bytetune.kernels.cpu_int8_gemm` says so). The CPU path and the tests' oracle.
- ``*_triton``: nothing waits for the device (fixed shapes; CUDA-graph friendly). One launch of
  :func:`_grouped_int8_matmul_kernel` covers every expert: its program ids run over (row tile, N
  tile), and a small table built on the device (:func:`tile_table`) maps each row tile to its
  expert and rows. The outlier columns (a fixed ``outlier_capacity`` per expert, padding masked)
  are multiplied in the same kernel after the int8 loop. The input gradient is the grouped twin
  :func:`_grouped_grad_input_kernel` (weight tiles dequantized in registers).
"""

from __future__ import annotations

import torch

from bytetune.kernels import _ops, gpu_arch
from bytetune.kernels.constants import INT8_MAX
from bytetune.kernels.dispatch import HAS_TRITON
from bytetune.kernels.gpu_arch import Tile, tile
from bytetune.kernels.llm_int8 import (
    int8_linear_reference,
    int8_matmul_grad_input_reference,
    quantize_rowwise,
    quantize_tokenwise,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.llm_int8.common import int8_dot_k_loop

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = [
    "grouped_int8_linear",
    "grouped_int8_linear_reference",
    "grouped_int8_linear_triton",
    "grouped_int8_grad_input",
    "grouped_int8_grad_input_reference",
    "grouped_int8_grad_input_triton",
    "expert_column_absmax",
    "quantize_experts",
    "dequantize_experts",
    "sort_by_expert",
    "tile_table",
]


# --------------------------------------------------------------------------------------------
# Shared pieces: weights, routing, checks
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights [E, N, K] float -> (int8 codes [E, N, K], float32 row absmax [E, N]),
    each expert quantized row-wise as Int8Linear's weight (llm_int8.quantize_rowwise)."""
    if w.dim() != 3:
        raise ValueError(f"expert weights must be 3-D [experts, out, in], got shape {tuple(w.shape)}")
    e, n, k = w.shape
    codes, scale = quantize_rowwise(w.reshape(e * n, k))
    return codes.reshape(e, n, k), scale.reshape(e, n)


def dequantize_experts(w_int8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code * absmax / 127 per expert row, [E, N, K] in ``dtype`` (computed in float32)."""
    return (w_int8.float() * (w_scale.float() / INT8_MAX)[:, :, None]).to(dtype)


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets) for a flat [R] tensor of expert ids: ``expert_ids[order]`` is sorted
    (stable), expert e's entries are ``order[offsets[e]:offsets[e + 1]]``. Ids outside
    [0, num_experts) (transformers' marker of a slot routed elsewhere) sort last, past
    ``offsets[-1]``. Fixed shapes: nothing waits for the device."""
    ids = expert_ids.reshape(-1).long()
    valid = (ids >= 0) & (ids < num_experts)
    keys = torch.where(valid, ids, num_experts)
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_experts + 1)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def _check_grouped(x_name: str, x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor, reduce_dim: int) -> None:
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{x_name} must be a 2-D float32/float16/bfloat16 tensor, got shape {tuple(x.shape)} dtype {x.dtype}")
    if w_int8.dim() != 3 or w_int8.dtype != torch.int8:
        raise ValueError(f"w_int8 must be 3-D int8 [experts, N, K], got shape {tuple(w_int8.shape)} dtype {w_int8.dtype}")
    e, n, k = w_int8.shape
    if x.shape[1] != (k if reduce_dim == 2 else n):
        raise ValueError(f"{x_name} {tuple(x.shape)} does not fit expert weights {tuple(w_int8.shape)} ([experts, N, K])")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (e, n):
        raise ValueError(f"w_scale must be float32 of shape ({e}, {n}), got shape {tuple(w_scale.shape)} dtype {w_scale.dtype}")
    if offsets.dim() != 1 or offsets.numel() != e + 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be an integer vector of {e + 1} row offsets (sort_by_expert), got {tuple(offsets.shape)} {offsets.dtype}")


def _host_offsets(offsets: torch.Tensor, rows: int) -> list[int]:
    bounds = offsets.tolist()
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1])) or bounds[-1] > rows:
        raise ValueError(f"offsets {bounds} must rise from 0 to at most the {rows} rows")
    return bounds


# --------------------------------------------------------------------------------------------
# PyTorch references (the CPU path)
# --------------------------------------------------------------------------------------------


def grouped_int8_linear_reference(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    offsets: torch.Tensor,
    threshold: float,
    outlier_capacity: int,
) -> torch.Tensor:
    """y [T, N] in x's dtype: rows of expert e are int8_linear(x[rows], w_int8[e], w_scale[e])
    (LLM.int8() with the outliers of that expert's tokens). Rows past ``offsets[-1]`` are 0."""
    _check_grouped("x", x, w_int8, w_scale, offsets, reduce_dim=2)
    bounds = _host_offsets(offsets, x.shape[0])
    y = torch.zeros(x.shape[0], w_int8.shape[1], dtype=x.dtype, device=x.device)
    for e, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        if stop > start:  # experts without tokens cost nothing
            y[start:stop] = int8_linear_reference(x[start:stop], w_int8[e], w_scale[e], None, threshold, outlier_capacity)
    return y


def grouped_int8_grad_input_reference(
    grad_y: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """grad_x [T, K] in grad_y's dtype: rows of expert e are grad_y[rows] @ dequant(w_int8[e])."""
    _check_grouped("grad_y", grad_y, w_int8, w_scale, offsets, reduce_dim=1)
    bounds = _host_offsets(offsets, grad_y.shape[0])
    grad_x = torch.zeros(grad_y.shape[0], w_int8.shape[2], dtype=grad_y.dtype, device=grad_y.device)
    for e, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        if stop > start:
            grad_x[start:stop] = int8_matmul_grad_input_reference(grad_y[start:stop], w_int8[e], w_scale[e])
    return grad_x


def expert_column_absmax_reference(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """max |x| of each column over each expert's rows, float32 [E, K] (0 for experts without rows)."""
    bounds = _host_offsets(offsets, x.shape[0])
    out = torch.zeros(len(bounds) - 1, x.shape[1], dtype=torch.float32, device=x.device)
    for e, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        if stop > start:
            out[e] = x[start:stop].abs().amax(dim=0).float()
    return out


# --------------------------------------------------------------------------------------------
# Launch configs (checked for every GPU generation by bench/gpu_compile.py)
# --------------------------------------------------------------------------------------------

# Two tiles, picked from the average number of rows per expert (a shape, known at launch): many
# tokens per expert (training, prefill) take the wide tile, few (decoding, many small experts)
# the thin one, which wastes less of each expert's last row tile. fp32 activations take their
# own small tile: the compile gate showed the wide one spilling (488-2880 B of stack, with 4 or 8
# warps) on sm_80..90 once the outlier loop's "ieee" fp32 dot sits beside the int32 accumulator.
GROUPED_MATMUL_TILES = {
    "many_rows": tile(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_C=32, num_warps=8, num_stages=3),
    "few_rows": tile(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BLOCK_C=32, num_warps=4, num_stages=3),
    "fp32": tile(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, BLOCK_C=16, num_warps=4, num_stages=3),
}
# The input gradient reduces over N (BLOCK_N) and writes BLOCK_K columns; fp32 gradients take
# the "ieee" dot, which holds more registers (llm_int8's fp32 grad tiles are this size).
GROUPED_GRAD_TILES = {
    "many_rows": tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    "few_rows": tile(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    "fp32": tile(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3),
}
FEW_ROWS_PER_EXPERT = 32
# The interpreter (CPU tensors) runs any tile; small ones keep the tests fast.
_INTERPRETER_MATMUL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_C": 16}
_INTERPRETER_GRAD = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
COLUMN_ABSMAX_TILE = tile(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=1)
_INTERPRETER_COLUMN_ABSMAX = {"BLOCK_M": 16, "BLOCK_K": 32}


def grouped_matmul_shared_bytes(config: Tile, out_bytes: int, x_bytes: int = 2) -> int:
    """Upper bound of the grouped GEMM's shared memory: num_stages int8 tiles of x and w, or the
    outlier loop's 16-bit x tile and dequantized weight tile, or the output tile."""
    bm, bn, bk, bc = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["BLOCK_C"]
    return max(config.num_stages * (bm * bk + bk * bn), (bm * bc + bc * bn) * max(x_bytes, 2) * 2, bm * bn * out_bytes)


def grouped_grad_shared_bytes(config: Tile, grad_bytes: int) -> int:
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    staged = config.num_stages * (bm * bn * grad_bytes + bn * bk) + bn * bk * grad_bytes + 1024
    return max(staged, bm * bk * grad_bytes)


def _pick(menu: dict, rows: int, experts: int) -> Tile:
    return menu["few_rows"] if rows <= FEW_ROWS_PER_EXPERT * max(experts, 1) else menu["many_rows"]


def tile_table(offsets: torch.Tensor, block_m: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tile_expert, tile_row_start, tile_row_stop), int32 [max_tiles]: row tile t covers rows
    tile_row_start[t]:tile_row_stop[t] of expert tile_expert[t]. The table has a fixed length, an
    upper bound of the tiles any routing of ``rows`` rows over E experts needs (rows / BLOCK_M + E);
    the tiles past the ones needed get an empty row range. Built on the device, no host sync."""
    experts = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_expert, 0)
    max_tiles = rows // block_m + experts
    ids = torch.arange(max_tiles, device=offsets.device)
    expert = torch.searchsorted(tile_end, ids, right=True).clamp_(max=experts - 1)
    local = ids - (tile_end - tiles_per_expert)[expert]
    start = offsets[expert] + local * block_m
    stop = torch.minimum(start + block_m, offsets[expert + 1])
    used = ids < tile_end[-1]
    start = torch.where(used, start, 0)
    stop = torch.where(used, stop, 0)
    return expert.to(torch.int32), start.to(torch.int32), stop.to(torch.int32)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _expert_column_absmax_kernel(
        x_ptr, offsets_ptr, out_ptr, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        # Grid (experts, column blocks): each program walks its expert's rows (a data-dependent
        # loop bound read on the device) and keeps the column maxima; NaN propagates, so a NaN
        # column is never mistaken for an ordinary one.
        expert = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        row_start = tl.load(offsets_ptr + expert).to(tl.int64)
        row_stop = tl.load(offsets_ptr + expert + 1).to(tl.int64)
        column_absmax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for m_start in range(row_start, row_stop, BLOCK_M):
            rows = m_start + tl.arange(0, BLOCK_M).to(tl.int64)
            block = tl.load(
                x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=(rows[:, None] < row_stop) & col_ok[None, :],
                other=0.0,
            )
            magnitude = tl.abs(block.to(tl.float32))
            # tl.max drops NaN (max.f32 returns the other operand): put it back where one was.
            has_nan = tl.max((magnitude != magnitude).to(tl.int32), axis=0) > 0
            block_max = tl.where(has_nan, float("nan"), tl.max(magnitude, axis=0))
            column_absmax = tl.maximum(column_absmax, block_max, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + expert * K + cols, column_absmax, mask=col_ok)

    @triton.jit
    def _grouped_int8_matmul_kernel(
        x_ptr,  # int8 [T, K], rows sorted by expert
        w_ptr,  # int8 [E, N, K]
        x_scale_ptr,  # fp32 [T]
        w_scale_ptr,  # fp32 [E, N]
        x_outlier_ptr,  # x dtype [T, C]: each row's values at its expert's outlier columns, 0 for padding
        outlier_cols_ptr,  # int64 [E, C]
        tile_expert_ptr,
        tile_start_ptr,
        tile_stop_ptr,
        out_ptr,
        N,
        K,
        C,
        stride_xm,
        stride_xk,
        stride_we,
        stride_wn,
        stride_wk,
        stride_om,
        stride_on,
        HAS_OUTLIERS: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # Program ids: (row tile of some expert, N tile). The row tile's expert and rows come from
        # the tile table; a tile past the ones the routing needs has no rows and returns at once.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
        row_start = tl.load(tile_start_ptr + pid_m)
        row_stop = tl.load(tile_stop_ptr + pid_m)
        if row_stop > row_start:
            rows = row_start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_stop
            # Rows past the tile's end read its first row (valid memory) instead of a masked
            # load per step; the store drops them. Columns past N wrap around the same way.
            rows_in = tl.where(row_ok, rows, row_start).to(tl.int64)
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            cols_in = (cols % N).to(tl.int64)
            w_expert_ptr = w_ptr + expert * stride_we
            acc = int8_dot_k_loop(
                x_ptr, w_expert_ptr, rows_in, cols_in, K, stride_xm, stride_xk, stride_wn, stride_wk,
                BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            # Epilogue in fp32, in llm_int8's order: acc * x_scale * w_scale / 127**2.
            x_scale = tl.load(x_scale_ptr + rows_in)
            w_scale = tl.load(w_scale_ptr + expert * N + cols_in)
            out = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
            out = tl.div_rn(out, 16129.0)
            if HAS_OUTLIERS:
                # The outlier columns in x's dtype times the dequantized weight columns, gathered
                # from the codes (no 16-bit copy of the weight exists).
                cs = tl.arange(0, BLOCK_C)
                w_step = w_scale / 127.0
                outlier_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for c_start in range(0, C, BLOCK_C):
                    c_ok = cs + c_start < C
                    xo = tl.load(
                        x_outlier_ptr + rows_in[:, None] * C + (c_start + cs)[None, :], mask=c_ok[None, :], other=0.0
                    )
                    k_cols = tl.load(outlier_cols_ptr + expert * C + c_start + cs, mask=c_ok, other=0)
                    w_codes = tl.load(
                        w_expert_ptr + cols_in[None, :] * stride_wn + k_cols[:, None] * stride_wk,
                        mask=c_ok[:, None],
                        other=0,
                    )
                    w_cols = w_codes.to(tl.float32) * w_step[None, :]
                    if DOT_IN_FP32:
                        outlier_acc = tl.dot(xo.to(tl.float32), w_cols, outlier_acc, input_precision="ieee")
                    else:
                        outlier_acc = tl.dot(xo, w_cols.to(xo.dtype), outlier_acc)
                out = out + outlier_acc
            out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))

    @triton.jit
    def _grouped_grad_input_kernel(
        grad_y_ptr,  # [T, N], rows sorted by expert
        w_ptr,  # int8 [E, N, K]
        w_scale_ptr,  # fp32 [E, N]
        tile_expert_ptr,
        tile_start_ptr,
        tile_stop_ptr,
        grad_x_ptr,  # [T, K]
        N,
        K,
        stride_gm,
        stride_gn,
        stride_we,
        stride_wn,
        stride_wk,
        stride_om,
        stride_ok,
        DOT_IN_FP32: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # grad_x rows of expert e = grad_y rows @ dequant(w[e]) [N, K], reducing over N; program
        # ids (row tile, K tile), rows from the tile table.
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
        row_start = tl.load(tile_start_ptr + pid_m)
        row_stop = tl.load(tile_stop_ptr + pid_m)
        if row_stop > row_start:
            rows = row_start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_stop
            rows_in = tl.where(row_ok, rows, row_start).to(tl.int64)
            cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
            cols_in = (cols % K).to(tl.int64)
            ns = tl.arange(0, BLOCK_N)
            g_ptrs = grad_y_ptr + rows_in[:, None] * stride_gm + ns[None, :] * stride_gn
            w_ptrs = w_ptr + expert * stride_we + ns.to(tl.int64)[:, None] * stride_wn + cols_in[None, :] * stride_wk
            acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for n_start in range(0, N, BLOCK_N):
                n_ok = ns + n_start < N
                g_tile = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
                w_codes = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
                w_row_scale = tl.load(w_scale_ptr + expert * N + n_start + ns, mask=n_ok, other=0.0) / 127.0
                w_tile = w_codes.to(tl.float32) * w_row_scale[:, None]
                if DOT_IN_FP32:
                    g_tile = g_tile.to(tl.float32)
                else:
                    w_tile = w_tile.to(g_tile.dtype)
                acc = tl.dot(g_tile, w_tile, acc, input_precision=DOT_PRECISION)
                g_ptrs += BLOCK_N * stride_gn
                w_ptrs += BLOCK_N * stride_wn
            out_ptrs = grad_x_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_ok
            tl.store(out_ptrs, acc.to(grad_x_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < K))


def _launch_kwargs(config: Tile | dict) -> dict:
    if isinstance(config, dict):  # interpreter tiles: warps and stages mean nothing there
        return dict(config)
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def expert_column_absmax_triton(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    experts, k = offsets.numel() - 1, x.shape[1]
    out = torch.zeros(experts, k, dtype=torch.float32, device=x.device)
    if x.shape[0] == 0 or k == 0 or experts == 0:
        return out
    config = COLUMN_ABSMAX_TILE if x.is_cuda else _INTERPRETER_COLUMN_ABSMAX
    grid = (experts, triton.cdiv(k, config["BLOCK_K"]))
    _expert_column_absmax_kernel[grid](x, offsets, out, k, x.stride(0), x.stride(1), **_launch_kwargs(config))
    return out


def _select_expert_outliers(x: torch.Tensor, offsets: torch.Tensor, threshold: float, capacity: int):
    """(cols [E, C] ascending, is_outlier [E, C]) for each expert, fixed C = min(capacity, K):
    the C columns of largest absmax over that expert's rows, marked when they reach the
    threshold (llm_int8.select_outlier_columns, per expert)."""
    column_absmax = expert_column_absmax(x, offsets)
    c = min(capacity, x.shape[1])
    top_absmax, top_cols = torch.topk(column_absmax, c, dim=1, sorted=False)
    cols, position = torch.sort(top_cols, dim=1)
    is_outlier = torch.gather(top_absmax, 1, position) >= threshold
    return cols, is_outlier


def _row_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    # Expert of each sorted row; rows past offsets[-1] get the last expert (their output is 0).
    experts = offsets.numel() - 1
    return torch.searchsorted(offsets[1:], torch.arange(rows, device=offsets.device), right=True).clamp_(max=experts - 1)


def grouped_int8_linear_triton(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    offsets: torch.Tensor,
    threshold: float,
    outlier_capacity: int,
) -> torch.Tensor:
    _check_grouped("x", x, w_int8, w_scale, offsets, reduce_dim=2)
    if not gpu_arch.dot_supported(x.device):
        return grouped_int8_linear_reference(x, w_int8, w_scale, offsets, threshold, outlier_capacity)
    if outlier_capacity < 0:
        raise ValueError(f"capacity must be >= 0 columns, got {outlier_capacity}")
    rows, k = x.shape
    experts, n, _ = w_int8.shape
    out = torch.zeros(rows, n, dtype=x.dtype, device=x.device)  # rows past offsets[-1] stay 0
    if rows == 0 or n == 0 or experts == 0:
        return out
    w_int8 = w_int8.contiguous()
    offsets = offsets.contiguous()
    use_outliers = threshold > 0 and outlier_capacity > 0 and k > 0
    row_expert = _row_experts(offsets, rows)
    if use_outliers:
        cols, is_outlier = _select_expert_outliers(x, offsets, threshold, outlier_capacity)
        row_cols, row_marked = cols[row_expert], is_outlier[row_expert]  # [T, C]
        # The outliers of each row's expert take the 16-bit path: 0 in the int8 part (and out of
        # its absmax), their values gathered into x_outlier; where, not a product, so that an
        # inf at a padding column cannot make a NaN.
        x_outlier = torch.where(row_marked, torch.gather(x, 1, row_cols), 0).contiguous()
        masked = x.scatter(1, row_cols, torch.where(row_marked, 0, torch.gather(x, 1, row_cols)))
        x_int8, x_scale = quantize_tokenwise(masked)
        outlier_cols = cols.contiguous()
    else:
        x_int8, x_scale = quantize_tokenwise(x)
        x_outlier, outlier_cols = x_scale, offsets  # unread when HAS_OUTLIERS is False
    if not x.is_cuda:
        config = _INTERPRETER_MATMUL
    elif x.dtype == torch.float32:
        config = GROUPED_MATMUL_TILES["fp32"]
    else:
        config = _pick(GROUPED_MATMUL_TILES, rows, experts)
    tile_expert, tile_start, tile_stop = tile_table(offsets, config["BLOCK_M"], rows)
    dot_in_fp32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda)
    grid = (tile_expert.numel(), triton.cdiv(n, config["BLOCK_N"]))
    _grouped_int8_matmul_kernel[grid](
        x_int8, w_int8, x_scale, w_scale.contiguous(), x_outlier, outlier_cols,
        tile_expert, tile_start, tile_stop, out,
        n, k, outlier_cols.shape[1] if use_outliers else 0,
        x_int8.stride(0), x_int8.stride(1), w_int8.stride(0), w_int8.stride(1), w_int8.stride(2),
        out.stride(0), out.stride(1),
        HAS_OUTLIERS=use_outliers, DOT_IN_FP32=dot_in_fp32, **_launch_kwargs(config),
    )  # fmt: skip
    return out


def grouped_int8_grad_input_triton(
    grad_y: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    _check_grouped("grad_y", grad_y, w_int8, w_scale, offsets, reduce_dim=1)
    if not gpu_arch.dot_supported(grad_y.device):
        return grouped_int8_grad_input_reference(grad_y, w_int8, w_scale, offsets)
    rows, n = grad_y.shape
    experts, _, k = w_int8.shape
    grad_x = torch.zeros(rows, k, dtype=grad_y.dtype, device=grad_y.device)
    if rows == 0 or k == 0 or n == 0 or experts == 0:
        return grad_x
    w_int8 = w_int8.contiguous()
    dot_in_fp32 = grad_y.dtype == torch.float32 or (grad_y.dtype == torch.bfloat16 and not grad_y.is_cuda)
    if grad_y.is_cuda:
        config = GROUPED_GRAD_TILES["fp32"] if dot_in_fp32 else _pick(GROUPED_GRAD_TILES, rows, experts)
    else:
        config = _INTERPRETER_GRAD
    tile_expert, tile_start, tile_stop = tile_table(offsets.contiguous(), config["BLOCK_M"], rows)
    grid = (tile_expert.numel(), triton.cdiv(k, config["BLOCK_K"]))
    _grouped_grad_input_kernel[grid](
        grad_y, w_int8, w_scale.contiguous(), tile_expert, tile_start, tile_stop, grad_x,
        n, k, grad_y.stride(0), grad_y.stride(1), w_int8.stride(0), w_int8.stride(1), w_int8.stride(2),
        grad_x.stride(0), grad_x.stride(1),
        DOT_IN_FP32=dot_in_fp32, DOT_PRECISION="ieee" if grad_y.dtype == torch.float32 else "tf32",
        **_launch_kwargs(config),
    )  # fmt: skip
    return grad_x


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def expert_column_absmax(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """max |x| of each column over each expert's rows, float32 [E, K]; NaN where a NaN is."""
    return _ops.expert_column_absmax(x, offsets)


def grouped_int8_linear(
    x: torch.Tensor,
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    offsets: torch.Tensor,
    threshold: float,
    outlier_capacity: int,
) -> torch.Tensor:
    """LLM.int8() of each expert over its rows of ``x`` (sorted by expert, ``offsets`` from
    :func:`sort_by_expert`): y [T, N] in x's dtype. GPU: one grouped kernel launch, fixed shapes;
    CPU: a loop over the experts holding tokens."""
    return _ops.grouped_int8_linear(x, w_int8, w_scale, offsets, threshold, outlier_capacity)


def grouped_int8_grad_input(
    grad_y: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """grad_x [T, K]: each expert's rows of grad_y @ its dequantized weight, in grad_y's dtype."""
    return _ops.grouped_int8_grad_input(grad_y, w_int8, w_scale, offsets)
