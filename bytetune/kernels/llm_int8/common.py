"""What the LLM.int8() ops share: input checks, the absmax guard, the interpreter's tiles, the
launch helpers and the Triton helpers (rounding, tile order, the int8 K-loop)."""

from __future__ import annotations

import torch

from bytetune.kernels import gpu_arch
from bytetune.kernels.dispatch import HAS_TRITON
from bytetune.kernels.gpu_arch import Tile, tile

if HAS_TRITON:
    import triton
    import triton.language as tl


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def _safe_absmax(absmax: torch.Tensor) -> torch.Tensor:
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax)


# One fixed GPU config per kernel, used when BYTETUNE_AUTOTUNE=0 (gpu_arch.autotune_enabled).
FIXED_GPU_TILE = tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


# Fixed small tiles for the interpreter (CPU tensors): autotuning there would only cost time.
_INTERPRETER_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


def _prune_for_device(tiles: list[Tile], configs: list, device: torch.device, shared_bytes) -> list:
    arch = gpu_arch.device_arch(device)
    if arch is None:
        return configs
    keep = {t.key() for t in gpu_arch.prune(tiles, *arch, shared_bytes)}
    return [c for c in configs if gpu_arch.config_key(c) in keep]


def _launch_kwargs(tiles: Tile | dict) -> dict:
    if isinstance(tiles, dict):  # interpreter tiles: warps and stages mean nothing there
        return tiles
    return dict(tiles.kwargs, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


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
    def int8_dot_k_loop(x_ptr, w_ptr, rows, cols, K, stride_xm, stride_xk, stride_wn, stride_wk,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """int32 [BLOCK_M, BLOCK_N] = x[rows, :K] @ w[cols, :K].T for int8 x [M, K] and w [N, K]
        (w's layout is nn.Linear.weight's). ``rows`` and ``cols`` are int64 indices already
        inside the tensors (callers wrap or clamp the ragged ends), so only K is masked. The
        dense GEMM and the experts' grouped GEMM both reduce through this loop."""
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k_start in range(0, K, BLOCK_K):
            k_ok = ks + k_start < K
            x_tile = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
            w_tile = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
            acc = tl.dot(x_tile, w_tile, acc, out_dtype=tl.int32)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        return acc
