"""``int8_matmul``: int8 x int8 -> int32 GEMM with a fused dequantizing epilogue,
``(x_int8 @ w_int8.T) * x_scale[:, None] * w_scale[None, :] / 127**2 (+ bias)``."""

from __future__ import annotations

import torch

from bytetune.kernels import _ops, gpu_arch
from bytetune.kernels.constants import INT8_MAX
from bytetune.kernels.cpu_int8_gemm import int32_matmul_nt, int32_matmul_nt_exact
from bytetune.kernels.dispatch import HAS_TRITON, launch_device
from bytetune.kernels.gpu_arch import Tile, tile
from bytetune.kernels.llm_int8.common import (
    _FLOAT_DTYPES,
    _INTERPRETER_TILES,
    FIXED_GPU_TILE,
    _check_int8_2d,
    _check_scale,
    _launch_kwargs,
    _prune_for_device,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.llm_int8.common import _tile_ids, int8_dot_k_loop


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


def matmul_shared_bytes(config: Tile, out_bytes: int) -> int:
    """Upper bound of the int8 GEMM's shared memory: num_stages int8 tiles of x and w (Ampere
    keeps num_stages - 1 of them, Hopper num_stages), or the output tile the epilogue may stage."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    return max(config.num_stages * (bm * bk + bk * bn), bm * bn * out_bytes)


def _prune_matmul_configs(configs, named_args, **kwargs):
    # Thin tiles only for few tokens, wide ones only for many: halves the tuning sweep.
    few_tokens = named_args["M_BUCKET"] <= 32
    configs = [c for c in configs if (c.kwargs["BLOCK_M"] <= 32) == few_tokens]
    out_bytes = named_args["out_ptr"].element_size()
    return _prune_for_device(
        MATMUL_TILES, configs, named_args["x_ptr"].device, lambda t: matmul_shared_bytes(t, out_bytes)
    )


if HAS_TRITON:

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
        acc = int8_dot_k_loop(
            x_ptr, w_ptr, rows_in, cols_in, K, stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K
        )

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

    _int8_matmul_tuned = triton.autotune(
        configs=gpu_arch.triton_configs(MATMUL_TILES),
        key=["M_BUCKET", "N", "K", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_matmul_configs},
    )(_int8_matmul_kernel)


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
    return _ops.int8_matmul(x_int8, w_int8, x_scale, w_scale, bias, out_dtype)
