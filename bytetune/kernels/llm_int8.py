"""LLM.int8() kernels: row-wise weight quantization, token-wise activation quantization with
outlier columns, the int8 x int8 -> int32 matmul with a fused dequantizing epilogue, and the
input gradient that dequantizes weight tiles on the fly.

Quantization convention (shared by every op here and by ``bytetune.quant_layers``):
``code = round_half_to_even(127 * value / absmax)`` computed in float32, stored as int8; the
scale kept is the float32 absmax itself, so ``value ~= code * scale / 127``. A row whose absmax
is 0 gets scale 1.0: its codes are all 0 either way, and the guard keeps 0/0 out of the math.

Each op exists as ``<op>_reference`` (plain PyTorch, the CPU path and the test oracle) and
``<op>_triton`` (the GPU path); the public ``<op>`` picks one with
:func:`bytetune.kernels.dispatch.use_triton` on its main input.
"""

from __future__ import annotations

import torch

from bytetune.kernels import gpu_arch
from bytetune.kernels.constants import INT8_MAX
from bytetune.kernels.cpu_int8_gemm import int32_matmul_nt, int32_matmul_nt_exact
from bytetune.kernels.dispatch import HAS_TRITON, launch_device, use_triton
from bytetune.kernels.gpu_arch import Tile, tile

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.dispatch import abs_bits, float_from_bits

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The reference input gradient dequantizes at most this many weight elements at a time (2 MiB
# of fp32), so it never holds an fp32 copy of a large weight. Measured on SmolLM2's shapes (one
# thread): 512k-element chunks cost the fp32 GEMM + 5-10 %; smaller ones cost more (each chunk is
# one more GEMM with a shorter reduction).
REFERENCE_GRAD_CHUNK_ELEMENTS = 1 << 19

__all__ = [
    "quantize_rowwise",
    "quantize_rowwise_reference",
    "quantize_rowwise_triton",
    "outlier_columns",
    "outlier_columns_reference",
    "outlier_columns_triton",
    "column_absmax",
    "column_absmax_reference",
    "column_absmax_triton",
    "select_outlier_columns",
    "quantize_tokenwise",
    "quantize_tokenwise_reference",
    "quantize_tokenwise_triton",
    "int8_matmul",
    "int8_linear",
    "int8_linear_reference",
    "int8_linear_fixed_capacity",
    "int8_matmul_reference",
    "int8_matmul_triton",
    "int8_matmul_grad_input",
    "int8_matmul_grad_input_reference",
    "int8_matmul_grad_input_triton",
]


# --------------------------------------------------------------------------------------------
# Input checks (shared by both implementations, so both fail the same way)
# --------------------------------------------------------------------------------------------


def _check_float_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [rows, cols], got shape {tuple(t.shape)}; reshape it first "
            f"(e.g. {name}.reshape(-1, {name}.shape[-1]))"
        )
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_int8_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or t.dtype != torch.int8:
        raise ValueError(
            f"{name} must be a 2-D int8 tensor, got shape {tuple(t.shape)} dtype {t.dtype}; "
            "produce it with quantize_rowwise / quantize_tokenwise"
        )


def _check_scale(name: str, scale: torch.Tensor, rows: int) -> None:
    if scale.dtype != torch.float32 or scale.shape != (rows,):
        raise ValueError(
            f"{name} must be float32 of shape ({rows},), got shape {tuple(scale.shape)} dtype "
            f"{scale.dtype}"
        )


def _check_matmul_args(x_int8, w_int8, x_scale, w_scale, bias) -> None:
    _check_int8_2d("x_int8", x_int8)
    _check_int8_2d("w_int8", w_int8)
    if x_int8.shape[1] != w_int8.shape[1]:
        raise ValueError(
            f"x_int8 {tuple(x_int8.shape)} and w_int8 {tuple(w_int8.shape)} disagree on K "
            "(w_int8 is [N, K], the layout of nn.Linear.weight)"
        )
    _check_scale("x_scale", x_scale, x_int8.shape[0])
    _check_scale("w_scale", w_scale, w_int8.shape[0])
    if bias is not None and (bias.shape != (w_int8.shape[0],) or bias.dtype not in _FLOAT_DTYPES):
        raise ValueError(
            f"bias must be a float vector of shape ({w_int8.shape[0]},), got shape "
            f"{tuple(bias.shape)} dtype {bias.dtype}"
        )


def _check_grad_input_args(grad_y, w_int8, w_scale) -> None:
    _check_float_2d("grad_y", grad_y)
    _check_int8_2d("w_int8", w_int8)
    if grad_y.shape[1] != w_int8.shape[0]:
        raise ValueError(
            f"grad_y {tuple(grad_y.shape)} must have N = w_int8.shape[0] = {w_int8.shape[0]} "
            "columns"
        )
    _check_scale("w_scale", w_scale, w_int8.shape[0])


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


def _safe_absmax(absmax: torch.Tensor) -> torch.Tensor:
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax)


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


# --------------------------------------------------------------------------------------------
# PyTorch references
# --------------------------------------------------------------------------------------------


def quantize_rowwise_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float_2d("w", w)
    w_scale = _safe_absmax(w.abs().amax(dim=1).float())
    return _quantize_with_scale(w, w_scale), w_scale


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


def _int32_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K].T int8 -> int32, exact."""
    if a.is_cuda:
        try:
            return torch._int_mm(a, b.t())
        except RuntimeError:
            # _int_mm refuses M <= 16 and K or N not multiples of 8 on CUDA
            return int32_matmul_nt_exact(a, b)
    # The CPU int8 GEMM (torch._int_mm, or exact fp32 K-chunks where that is faster).
    return int32_matmul_nt(a, b)


def int8_matmul_reference(
    x_int8: torch.Tensor,
    w_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    _check_matmul_args(x_int8, w_int8, x_scale, w_scale, bias)
    # On CPU the epilogue's passes over [M, N] cost a good part of the int8 GEMM itself, so they
    # run in place, and the division by 127**2 rides on the [N] weight scales instead of the
    # [M, N] product (a division is slower than a multiply). The Triton kernel divides last;
    # the two orders differ by an ulp or so.
    product = _int32_matmul_nt(x_int8, w_int8)
    # int32 -> float32 in the product's own memory (same element size, element by element): one
    # [M, N] buffer fewer per call.
    out = product.view(torch.float32).copy_(product)
    out.mul_(x_scale[:, None]).mul_((w_scale / (INT8_MAX * INT8_MAX))[None, :])
    if bias is not None:
        out.add_(bias.float())
    return out.to(out_dtype)


def int8_matmul_grad_input_reference(
    grad_y: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    _check_grad_input_args(grad_y, w_int8, w_scale)
    (m, n), k = grad_y.shape, w_int8.shape[1]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, k, dtype=grad_y.dtype, device=grad_y.device)
    grad_x = torch.empty(m, k, dtype=torch.float32, device=grad_y.device)
    grad_y32 = grad_y.float()
    # Dequantized as the Triton kernel does it: code * (absmax / 127). (On a GPU the kernel's fp32
    # `/` is div.full.f32, within 2 ulp of this IEEE division: the two agree to rounding, not bits.)
    w_step = w_scale[:, None] / INT8_MAX
    rows_per_chunk = max(1, REFERENCE_GRAD_CHUNK_ELEMENTS // k)
    w_chunk_buffer = torch.empty(min(rows_per_chunk, n), k, dtype=torch.float32, device=grad_y.device)
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        # Convert, then scale in place: both passes are vectorized, unlike one mixed-dtype
        # multiply (int8 * fp32), which measured 3x slower.
        w_chunk = w_chunk_buffer[: stop - start].copy_(w_int8[start:stop]).mul_(w_step[start:stop])
        if start == 0:  # the first chunk writes grad_x: no zero-fill, no read-back
            torch.mm(grad_y32[:, start:stop], w_chunk, out=grad_x)
        else:
            grad_x.addmm_(grad_y32[:, start:stop], w_chunk)
    return grad_x.to(grad_y.dtype)


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


# --------------------------------------------------------------------------------------------
# Launch configs (checked for every GPU generation by bench/gpu_compile.py)
# --------------------------------------------------------------------------------------------

# Large tiles for thousands of tokens; thin-M tiles for decoding (M = 1..16), where the op is a
# weight-bandwidth-bound GEMV and wants many programs along N. Kept short: every config is one
# more compile on a fresh machine. What the compile gate (bench/gpu_compile.py) changed: the
# 128x256 tile spills on sm_80..89 (664 B of stack at 255 registers) and runs on sm_90 only;
# 128x128x64 had 4 warps and spilled (560 B) on sm_80..89, with 8 warps it does not.
MATMUL_TILES = [
    tile(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, min_capability=90),
    tile(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    tile(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    tile(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    tile(BLOCK_M=32, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4),
    tile(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4),
    tile(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
]
# The input gradient reduces over N (BLOCK_N) and writes BLOCK_K output columns. 16-bit grad_y:
# tensor-core dots; the 128x256-output tile spills on sm_80..89 like the GEMM's.
GRAD_INPUT_TILES = [
    tile(BLOCK_M=128, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=8, num_stages=3, min_capability=90),
    tile(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    tile(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    tile(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    tile(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
]
# fp32 grad_y: the "ieee" dot runs on FMA units and holds far more registers; every 16-bit tile
# above spills with it (the gate measured 200-9600 B of stack), these two do not.
GRAD_INPUT_TILES_FP32 = [
    tile(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    tile(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
]
# One fixed GPU config per kernel, used when BYTETUNE_AUTOTUNE=0 (gpu_arch.autotune_enabled).
FIXED_GPU_TILE = tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
FIXED_GPU_TILE_FP32_GRAD = GRAD_INPUT_TILES_FP32[1]
# Fixed small tiles for the interpreter (CPU tensors): autotuning there would only cost time.
_INTERPRETER_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
# The row quantizer's K tile: the next power of two of K, capped (the largest the gate checks).
QUANTIZE_ROWS_BLOCK_K = (1024,)
COLUMN_ABSMAX_TILE = tile(ROWS_PER_PROGRAM=256, BLOCK_M=32, BLOCK_K=128)
_INTERPRETER_COLUMN_ABSMAX_TILE = tile(ROWS_PER_PROGRAM=64, BLOCK_M=16, BLOCK_K=64)


def matmul_shared_bytes(config: Tile, out_bytes: int) -> int:
    """Upper bound of the int8 GEMM's shared memory: num_stages int8 tiles of x and w (Ampere
    keeps num_stages - 1 of them, Hopper num_stages), or the output tile the epilogue may stage."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    return max(config.num_stages * (bm * bk + bk * bn), bm * bn * out_bytes)


def grad_input_shared_bytes(config: Tile, grad_bytes: int) -> int:
    """Upper bound for the input-gradient kernel: per stage a grad_y tile and an int8 weight-code
    tile, plus the dequantized weight tile in grad_y's dtype and 1 KiB of scratch (what the gate
    measured on sm_90), or the output tile."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    staged = config.num_stages * (bm * bn * grad_bytes + bn * bk) + bn * bk * grad_bytes + 1024
    return max(staged, bm * bk * grad_bytes)


def _prune_for_device(tiles: list[Tile], configs: list, device: torch.device, shared_bytes) -> list:
    arch = gpu_arch.device_arch(device)
    if arch is None:
        return configs
    keep = {t.key() for t in gpu_arch.prune(tiles, *arch, shared_bytes)}
    return [c for c in configs if gpu_arch.config_key(c) in keep]


def _prune_matmul_configs(configs, named_args, **kwargs):
    # Thin tiles only for few tokens, wide ones only for many: halves the tuning sweep.
    few_tokens = named_args["M_BUCKET"] <= 32
    configs = [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == few_tokens]
    out_bytes = named_args["out_ptr"].element_size()
    return _prune_for_device(
        MATMUL_TILES, configs, named_args["x_ptr"].device, lambda t: matmul_shared_bytes(t, out_bytes)
    )


def _prune_grad_input_configs(configs, named_args, **kwargs):
    menu = GRAD_INPUT_TILES_FP32 if kwargs["DOT_IN_FP32"] else GRAD_INPUT_TILES
    in_menu = {t.key() for t in menu}
    few_tokens = named_args["M_BUCKET"] <= 32
    configs = [
        c for c in configs if gpu_arch.config_key(c) in in_menu and (c.kwargs["BLOCK_M"] <= 32) == few_tokens
    ]  # fmt: skip
    grad_bytes = named_args["grad_y_ptr"].element_size()
    return _prune_for_device(
        menu, configs, named_args["grad_y_ptr"].device, lambda t: grad_input_shared_bytes(t, grad_bytes)
    )


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _round_half_to_even(v):
        # torch.round's rule. libdevice.rint would do, but the interpreter cannot run it; this
        # form is exact: floor and a - floor(a) (a >= 0) never round.
        a = tl.abs(v)
        whole = tl.floor(a)
        frac = a - whole
        whole_is_odd = (whole - 2.0 * tl.floor(whole * 0.5)) == 1.0
        round_up = (frac > 0.5) | ((frac == 0.5) & whole_is_odd)
        rounded = tl.where(round_up, whole + 1.0, whole)
        return tl.where(v < 0, -rounded, rounded)

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

    @triton.jit
    def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Grouped launch order: GROUP_M row-tiles share each column-tile while it is in L2.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        pids_per_group = GROUP_M * num_pid_n
        first_pid_m = (pid // pids_per_group) * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
        pid_n = (pid % pids_per_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _int8_matmul_kernel(
        x_ptr,
        w_ptr,
        x_scale_ptr,
        w_scale_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        M_BUCKET,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_om,
        stride_on,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # M_BUCKET is only an autotuning key (next power of two of M), so every batch size of a
        # training run does not trigger a fresh tuning sweep.
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows/cols wrap around to valid memory instead of being masked on every
        # load; the epilogue store drops them.
        rows_in = (rows % M).to(tl.int64)
        cols_in = (cols % N).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows_in[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w_ptr + cols_in[None, :] * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k_start in range(0, K, BLOCK_K):
            k_ok = ks + k_start < K
            x_tile = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
            w_tile = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
            acc = tl.dot(x_tile, w_tile, acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        # Epilogue in fp32, same operation order as the reference.
        x_scale = tl.load(x_scale_ptr + rows_in)
        w_scale = tl.load(w_scale_ptr + cols_in)
        out = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
        out = tl.div_rn(out, 16129.0)
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(
            out_ptrs,
            out.to(out_ptr.dtype.element_ty),
            mask=(rows[:, None] < M) & (cols[None, :] < N),
        )

    @triton.jit
    def _int8_grad_input_kernel(
        grad_y_ptr,
        w_ptr,
        w_scale_ptr,
        grad_x_ptr,
        M,
        N,
        K,
        M_BUCKET,
        stride_gm,
        stride_gn,
        stride_wn,
        stride_wk,
        stride_om,
        stride_ok,
        DOT_IN_FP32: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # grad_x [M, K] = grad_y [M, N] @ dequant(w) [N, K], reducing over N. Each weight tile is
        # dequantized in registers to grad_y's dtype right before the dot.
        pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rows_in = (rows % M).to(tl.int64)
        cols_in = (cols % K).to(tl.int64)
        ns = tl.arange(0, BLOCK_N)
        g_ptrs = grad_y_ptr + rows_in[:, None] * stride_gm + ns[None, :] * stride_gn
        w_ptrs = w_ptr + ns.to(tl.int64)[:, None] * stride_wn + cols_in[None, :] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for n_start in range(0, N, BLOCK_N):
            n_ok = ns + n_start < N
            g_tile = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            w_codes = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
            w_row_scale = tl.load(w_scale_ptr + n_start + ns, mask=n_ok, other=0.0) / 127.0
            w_tile = w_codes.to(tl.float32) * w_row_scale[:, None]
            if DOT_IN_FP32:
                g_tile = g_tile.to(tl.float32)
            else:
                w_tile = w_tile.to(g_tile.dtype)
            acc = tl.dot(g_tile, w_tile, acc, input_precision=DOT_PRECISION)
            g_ptrs += BLOCK_N * stride_gn
            w_ptrs += BLOCK_N * stride_wn
        out_ptrs = grad_x_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_ok
        tl.store(
            out_ptrs,
            acc.to(grad_x_ptr.dtype.element_ty),
            mask=(rows[:, None] < M) & (cols[None, :] < K),
        )

    _int8_matmul_tuned = triton.autotune(
        configs=gpu_arch.triton_configs(MATMUL_TILES),
        key=["M_BUCKET", "N", "K", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_matmul_configs},
    )(_int8_matmul_kernel)
    _int8_grad_input_tuned = triton.autotune(
        configs=gpu_arch.triton_configs(GRAD_INPUT_TILES + GRAD_INPUT_TILES_FP32),
        key=["M_BUCKET", "N", "K", "DOT_IN_FP32"],
        prune_configs_by={"early_config_prune": _prune_grad_input_configs},
    )(_int8_grad_input_kernel)

def _launch_kwargs(tiles: Tile | dict) -> dict:
    if isinstance(tiles, dict):  # interpreter tiles: warps and stages mean nothing there
        return tiles
    return dict(tiles.kwargs, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


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


def int8_matmul_triton(
    x_int8: torch.Tensor,
    w_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    _check_matmul_args(x_int8, w_int8, x_scale, w_scale, bias)
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if not gpu_arch.dot_supported(x_int8.device):
        return int8_matmul_reference(x_int8, w_int8, x_scale, w_scale, bias, out_dtype)
    m, k = x_int8.shape
    n = w_int8.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=x_int8.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
    args = (
        x_int8,
        w_int8,
        x_scale,
        w_scale,
        bias if bias is not None else x_scale,  # unread when HAS_BIAS is False
        out,
        m,
        n,
        k,
        gpu_arch.m_bucket(m),
        x_int8.stride(0),
        x_int8.stride(1),
        w_int8.stride(0),
        w_int8.stride(1),
        out.stride(0),
        out.stride(1),
    )
    with launch_device(x_int8):
        if x_int8.is_cuda and gpu_arch.autotune_enabled():
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
            )
            _int8_matmul_tuned[grid](*args, HAS_BIAS=bias is not None)
        else:
            tiles = FIXED_GPU_TILE if x_int8.is_cuda else _INTERPRETER_TILES
            grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]),)
            _int8_matmul_kernel[grid](*args, HAS_BIAS=bias is not None, **_launch_kwargs(tiles))
    return out


def int8_matmul_grad_input_triton(
    grad_y: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    _check_grad_input_args(grad_y, w_int8, w_scale)
    if not gpu_arch.dot_supported(grad_y.device):
        return int8_matmul_grad_input_reference(grad_y, w_int8, w_scale)
    m, n = grad_y.shape
    k = w_int8.shape[1]
    grad_x = torch.empty(m, k, dtype=grad_y.dtype, device=grad_y.device)
    if m == 0 or k == 0:
        return grad_x
    if n == 0:
        return grad_x.zero_()
    # fp32 gradients get a true fp32 product; tf32 would cost ~3 decimal digits. On the GPU a
    # 16-bit grad_y meets a weight tile dequantized to the same 16-bit dtype (tensor cores). The
    # interpreter (CPU tensors) multiplies bf16 tiles as raw uint16 bits, so there bf16 tiles
    # are multiplied in fp32 instead.
    dot_in_fp32 = grad_y.dtype == torch.float32 or (
        grad_y.dtype == torch.bfloat16 and not grad_y.is_cuda
    )
    precision = "ieee" if grad_y.dtype == torch.float32 else "tf32"
    args = (
        grad_y,
        w_int8,
        w_scale,
        grad_x,
        m,
        n,
        k,
        gpu_arch.m_bucket(m),
        grad_y.stride(0),
        grad_y.stride(1),
        w_int8.stride(0),
        w_int8.stride(1),
        grad_x.stride(0),
        grad_x.stride(1),
    )
    with launch_device(grad_y):
        if grad_y.is_cuda and gpu_arch.autotune_enabled():
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),
            )
            _int8_grad_input_tuned[grid](*args, DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=precision)
        else:
            tiles = _INTERPRETER_TILES
            if grad_y.is_cuda:
                tiles = FIXED_GPU_TILE_FP32_GRAD if dot_in_fp32 else FIXED_GPU_TILE
            grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(k, tiles["BLOCK_K"]),)
            _int8_grad_input_kernel[grid](
                *args, DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=precision, **_launch_kwargs(tiles)
            )
    return grad_x


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] float -> (int8 codes [N, K], float32 row absmax [N]; 1.0 for all-zero rows)."""
    if use_triton(w):
        return quantize_rowwise_triton(w)
    return quantize_rowwise_reference(w)


def column_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each column of x [M, K], float32 [K] (zeros when M = 0)."""
    if use_triton(x):
        return column_absmax_triton(x)
    return column_absmax_reference(x)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted unique indices of the columns of x [M, K] holding any |x| >= threshold.

    ``threshold <= 0`` turns the outlier decomposition off: the result is empty. The result's
    length depends on the data, so this op waits for the device (``nonzero``); the layers use
    :func:`select_outlier_columns` instead.
    """
    if use_triton(x):
        return outlier_columns_triton(x, threshold)
    return outlier_columns_reference(x, threshold)


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

    GPU tensors take :func:`int8_linear_fixed_capacity` (Triton kernels, no host sync); CPU
    tensors :func:`int8_linear_reference` (the same result, without the padding columns).
    """
    if use_triton(x):
        return int8_linear_fixed_capacity(x, w_int8, w_scale, bias, threshold, outlier_capacity)
    return int8_linear_reference(x, w_int8, w_scale, bias, threshold, outlier_capacity)


def quantize_tokenwise(
    x: torch.Tensor, outlier_cols: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (int8 codes [M, K], float32 row absmax [M]).

    The absmax of each row ignores ``outlier_cols`` (column indices, or a bool mask [K]) and
    their codes are 0: those columns take the 16-bit path in the layer.
    """
    if use_triton(x):
        return quantize_tokenwise_triton(x, outlier_cols)
    return quantize_tokenwise_reference(x, outlier_cols)


def int8_matmul(
    x_int8: torch.Tensor,
    w_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(x_int8 @ w_int8.T in int32) * x_scale[:, None] * w_scale[None, :] / 127**2 (+ bias).

    The epilogue runs in float32; the result is written in ``out_dtype`` (pass the activation
    dtype so bf16 models stay bf16).
    """
    if use_triton(x_int8):
        return int8_matmul_triton(x_int8, w_int8, x_scale, w_scale, bias, out_dtype)
    return int8_matmul_reference(x_int8, w_int8, x_scale, w_scale, bias, out_dtype)


def int8_matmul_grad_input(
    grad_y: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """grad_y [M, N] @ (w_int8 * w_scale[:, None] / 127) -> [M, K] in grad_y's dtype.

    Accumulates in float32. The Triton kernel dequantizes weight tiles in registers, so no
    16-bit copy of the weight is ever materialized.
    """
    if use_triton(grad_y):
        return int8_matmul_grad_input_triton(grad_y, w_int8, w_scale)
    return int8_matmul_grad_input_reference(grad_y, w_int8, w_scale)
