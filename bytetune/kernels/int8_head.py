"""Weight-only int8 matmul for frozen output heads and embeddings (row-wise int8 weight, float
activations), and the row gather that dequantizes only the looked-up embedding rows.

A head's input is a 16-bit (or fp32) hidden state with no outlier structure worth a decomposition,
and its output feeds a softmax: quantizing the activations would only add error. So only the
weight is int8: ``y = x @ (w_int8 * w_scale[:, None] / 127).T``. Because the scale is per output
row, the kernel multiplies raw codes (exact in any float dtype: |code| <= 127) and applies the
scale once per output column in the epilogue; that is the tile-by-tile dequantization with the
multiply moved out of the inner loop.

The input gradient ``grad_x = grad_y @ dequant(w)`` is exactly LLM.int8()'s
:func:`bytetune.kernels.llm_int8.int8_matmul_grad_input`, re-exported here.

Codes and scales follow :mod:`bytetune.kernels.llm_int8` (``quantize_rowwise``): scale = float32
row absmax, ``value ~= code * scale / 127``.

Launch configs are explicit (:data:`GPU_CONFIGS`, :data:`INTERPRETER_CONFIG`) so that a compile
gate can enumerate them; the CUDA path picks one by token count, no autotuning sweep.
"""

from __future__ import annotations

import torch

from bytetune.kernels import _ops
from bytetune.kernels.constants import INT8_MAX
from bytetune.kernels.dispatch import HAS_TRITON, launch_device
from bytetune.kernels.llm_int8 import int8_matmul_grad_input, quantize_rowwise

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.llm_int8.common import _tile_ids

__all__ = [
    "GPU_CONFIGS",
    "INTERPRETER_CONFIG",
    "embedding_lookup",
    "int8_matmul_grad_input",
    "quantize_rowwise",
    "weight_only_matmul",
    "weight_only_matmul_reference",
    "weight_only_matmul_triton",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The reference multiplies this many weight rows at a time, so neither it nor a CPU training step
# ever holds a float copy of a whole 250k-row head.
REFERENCE_CHUNK_ROWS = 4096

# 16-bit activations: "many_tokens" for training-size M (hundreds of tokens and up), "few_tokens"
# for decoding-size M (<= 32), a GEMV over the weight. fp32 activations take the exact (non-tf32)
# product: "fp32" is a smaller tile, since 128 x 128 fp32 tiles spilled ~10 KB of stack and needed
# 112 KB of shared memory (more than sm_86's 99 KB) in an AOT compile for sm_80/sm_86; these three
# compiled without spills (16-bit: 48 KB / 60 KB shared, fp32: 20 KB).
GPU_CONFIGS = {
    "many_tokens": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "few_tokens": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    "fp32": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
}
# Small tiles under the interpreter (CPU tensors): odd shapes exercise every mask.
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)


def _check_args(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"x must be a 2-D float32/float16/bfloat16 tensor [tokens, in], got shape {tuple(x.shape)} "
            f"dtype {x.dtype}; reshape it first (x.reshape(-1, x.shape[-1]))"
        )
    if w_int8.dim() != 2 or w_int8.dtype != torch.int8:
        raise ValueError(
            f"w_int8 must be a 2-D int8 tensor [out, in], got shape {tuple(w_int8.shape)} dtype {w_int8.dtype}; "
            "produce it with quantize_rowwise"
        )
    if x.shape[1] != w_int8.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and w_int8 {tuple(w_int8.shape)} disagree on the input size")
    if w_scale.dtype != torch.float32 or w_scale.shape != (w_int8.shape[0],):
        raise ValueError(
            f"w_scale must be float32 of shape ({w_int8.shape[0]},), got shape {tuple(w_scale.shape)} dtype {w_scale.dtype}"
        )


def weight_only_matmul_reference(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ dequant(w_int8 [N, K]).T -> [M, N] in x's dtype, accumulated in float32."""
    _check_args(x, w_int8, w_scale)
    n_rows = w_int8.shape[0]
    out = torch.empty(x.shape[0], n_rows, dtype=x.dtype, device=x.device)
    x32 = x.float()
    for start in range(0, n_rows, REFERENCE_CHUNK_ROWS):
        stop = min(start + REFERENCE_CHUNK_ROWS, n_rows)
        # Same order as the kernel: raw codes first, the row scale in the epilogue.
        acc = x32 @ w_int8[start:stop].float().t()
        out[:, start:stop] = (acc * (w_scale[start:stop] / INT8_MAX)[None, :]).to(x.dtype)
    return out


if HAS_TRITON:

    @triton.jit
    def _weight_only_matmul_kernel(
        x_ptr,
        w_ptr,
        w_scale_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_om,
        stride_on,
        DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows/cols wrap to valid memory instead of masking every load; the store
        # drops them.
        rows_in = (rows % M).to(tl.int64)
        cols_in = (cols % N).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows_in[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w_ptr + cols_in[None, :] * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k_ok = ks + k_start < K
            x_tile = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w_codes = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
            if DOT_IN_FP32:
                acc = tl.dot(x_tile.to(tl.float32), w_codes.to(tl.float32), acc, input_precision="ieee")
            else:
                # int8 codes are exact in fp16/bf16: a 16-bit tensor-core dot, fp32 accumulate.
                acc = tl.dot(x_tile, w_codes.to(x_tile.dtype), acc)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        w_scale = tl.load(w_scale_ptr + cols_in) / 127.0
        out = acc * w_scale[None, :]
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def launch_config(x: torch.Tensor) -> dict:
    """The tile config a launch on ``x`` uses (one of GPU_CONFIGS, or INTERPRETER_CONFIG)."""
    if not x.is_cuda:
        return dict(INTERPRETER_CONFIG)
    if x.dtype == torch.float32:
        return dict(GPU_CONFIGS["fp32"])
    return dict(GPU_CONFIGS["few_tokens" if x.shape[0] <= 32 else "many_tokens"])


def weight_only_matmul_triton(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    _check_args(x, w_int8, w_scale)
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: call weight_only_matmul_reference")
    m, k = x.shape
    n = w_int8.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    config = launch_config(x)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    # fp32 activations get an exact fp32 product (tf32 would cost ~3 digits in the logits). The
    # interpreter multiplies bf16 tiles as raw bits, so there 16-bit tiles go through fp32 too.
    dot_in_fp32 = x.dtype == torch.float32 or not x.is_cuda
    with launch_device(x):
        _weight_only_matmul_kernel[grid](
            x, w_int8, w_scale, out, m, n, k,
            x.stride(0), x.stride(1), w_int8.stride(0), w_int8.stride(1), out.stride(0), out.stride(1),
            DOT_IN_FP32=dot_in_fp32, **config,
        )
    return out


def weight_only_matmul(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float @ (w_int8 [N, K] * w_scale[:, None] / 127).T -> [M, N] in x's dtype.

    Accumulates in float32; the float weight is never materialized whole (the kernel converts
    code tiles in registers, the reference dequantizes 4096 rows at a time).
    """
    # On a GPU below sm_80 (no tl.dot, bench/gpu_compile.py) the CUDA kernel is the reference.
    return _ops.weight_only_matmul(x, w_int8, w_scale)


def embedding_lookup(ids: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of dequant(w_int8) in ``dtype``: gathers int8 rows and their scales only.

    No Triton kernel: the op is one gather of ``tokens x hidden`` bytes and one elementwise
    multiply, memory-bound either way; a fused kernel would only save the small float32
    intermediate of the gathered rows (tokens x hidden x 4 bytes), not the table.
    """
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"embedding ids must be int64/int32 token ids, got {ids.dtype}")
    codes = w_int8[ids]
    return (codes.float() * (w_scale[ids] / INT8_MAX)[..., None]).to(dtype)
