"""``int8_matmul_grad_input``: grad_y [M, N] @ dequant(w_int8) [N, K], the weight dequantized a
tile at a time (in registers on the GPU, in 2 MiB chunks in the reference)."""

from __future__ import annotations

import torch

from bytetune.kernels import _ops, gpu_arch
from bytetune.kernels.constants import INT8_MAX
from bytetune.kernels.dispatch import HAS_TRITON, launch_device
from bytetune.kernels.gpu_arch import Tile, tile
from bytetune.kernels.llm_int8.common import (
    _INTERPRETER_TILES,
    FIXED_GPU_TILE,
    _check_float_2d,
    _check_int8_2d,
    _check_scale,
    _launch_kwargs,
    _prune_for_device,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.llm_int8.common import _tile_ids


# The reference input gradient dequantizes at most this many weight elements at a time (2 MiB
# of fp32), so it never holds an fp32 copy of a large weight. Measured on SmolLM2's shapes (one
# thread): 512k-element chunks cost the fp32 GEMM + 5-10 %; smaller ones cost more (each chunk is
# one more GEMM with a shorter reduction).
REFERENCE_GRAD_CHUNK_ELEMENTS = 1 << 19


def _check_grad_input_args(grad_y, w_int8, w_scale) -> None:
    _check_float_2d("grad_y", grad_y)
    _check_int8_2d("w_int8", w_int8)
    if grad_y.shape[1] != w_int8.shape[0]:
        raise ValueError(
            f"grad_y {tuple(grad_y.shape)} must have N = w_int8.shape[0] = {w_int8.shape[0]} "
            "columns"
        )
    _check_scale("w_scale", w_scale, w_int8.shape[0])


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


FIXED_GPU_TILE_FP32_GRAD = GRAD_INPUT_TILES_FP32[1]


def grad_input_shared_bytes(config: Tile, grad_bytes: int) -> int:
    """Upper bound for the input-gradient kernel: per stage a grad_y tile and an int8 weight-code
    tile, plus the dequantized weight tile in grad_y's dtype and 1 KiB of scratch (what the gate
    measured on sm_90), or the output tile."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    staged = config.num_stages * (bm * bn * grad_bytes + bn * bk) + bn * bk * grad_bytes + 1024
    return max(staged, bm * bk * grad_bytes)


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


if HAS_TRITON:

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

    _int8_grad_input_tuned = triton.autotune(
        configs=gpu_arch.triton_configs(GRAD_INPUT_TILES + GRAD_INPUT_TILES_FP32),
        key=["M_BUCKET", "N", "K", "DOT_IN_FP32"],
        prune_configs_by={"early_config_prune": _prune_grad_input_configs},
    )(_int8_grad_input_kernel)


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


def int8_matmul_grad_input(
    grad_y: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """grad_y [M, N] @ (w_int8 * w_scale[:, None] / 127) -> [M, K] in grad_y's dtype.

    Accumulates in float32. The Triton kernel dequantizes weight tiles in registers, so no
    16-bit copy of the weight is ever materialized.
    """
    return _ops.int8_matmul_grad_input(grad_y, w_int8, w_scale)
