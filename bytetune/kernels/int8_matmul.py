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

from bytetune.kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

INT8_MAX = 127.0
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The reference input gradient dequantizes this many weight rows at a time, so the oracle never
# holds a full fp32 copy of a large weight either.
_REFERENCE_GRAD_CHUNK_ROWS = 1024

__all__ = [
    "quantize_rowwise",
    "quantize_rowwise_reference",
    "outlier_columns",
    "outlier_columns_reference",
    "quantize_tokenwise",
    "quantize_tokenwise_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "int8_matmul_grad_input",
    "int8_matmul_grad_input_reference",
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


def _safe_absmax(absmax: torch.Tensor) -> torch.Tensor:
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax)


def _quantize_with_scale(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Multiply first, then divide: the Triton kernels use the same order, so the codes agree
    # bit for bit (torch.round is round-half-to-even).
    return torch.round(values.float() * INT8_MAX / scale[:, None]).clamp_(-127, 127).to(torch.int8)


# --------------------------------------------------------------------------------------------
# PyTorch references
# --------------------------------------------------------------------------------------------


def quantize_rowwise_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float_2d("w", w)
    w_scale = _safe_absmax(w.abs().amax(dim=1).float())
    return _quantize_with_scale(w, w_scale), w_scale


def outlier_columns_reference(x: torch.Tensor, threshold: float) -> torch.Tensor:
    _check_float_2d("x", x)
    if threshold <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    # Compared in float32 so a threshold that is not representable in bf16/fp16 is not rounded.
    column_absmax = x.abs().amax(dim=0).float()
    return torch.nonzero(column_absmax >= threshold).flatten()


def quantize_tokenwise_reference(
    x: torch.Tensor, outlier_cols: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float_2d("x", x)
    if outlier_cols is not None and outlier_cols.numel() > 0:
        x = x.clone()
        x[:, outlier_cols] = 0
    x_scale = _safe_absmax(x.abs().amax(dim=1).float())
    return _quantize_with_scale(x, x_scale), x_scale


def _int32_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K].T int8 -> int32, exact."""
    try:
        return torch._int_mm(a, b.t())
    except RuntimeError:
        # _int_mm refuses some shapes/devices; an int32 product is exact for K < 2**31 / 127**2.
        return a.int() @ b.int().t()


def int8_matmul_reference(
    x_int8: torch.Tensor,
    w_int8: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    _check_matmul_args(x_int8, w_int8, x_scale, w_scale, bias)
    acc = _int32_matmul_nt(x_int8, w_int8).float()
    out = acc * x_scale[:, None] * w_scale[None, :] / (INT8_MAX * INT8_MAX)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_matmul_grad_input_reference(
    grad_y: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    _check_grad_input_args(grad_y, w_int8, w_scale)
    n_rows = w_int8.shape[0]
    grad_x = torch.zeros(grad_y.shape[0], w_int8.shape[1], dtype=torch.float32, device=grad_y.device)
    for start in range(0, n_rows, _REFERENCE_GRAD_CHUNK_ROWS):
        stop = min(start + _REFERENCE_GRAD_CHUNK_ROWS, n_rows)
        w_chunk = w_int8[start:stop].float() * w_scale[start:stop, None] / INT8_MAX
        grad_x += grad_y[:, start:stop].float() @ w_chunk
    return grad_x.to(grad_y.dtype)


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] float -> (int8 codes [N, K], float32 row absmax [N]; 1.0 for all-zero rows)."""
    if use_triton(w):
        return quantize_rowwise_triton(w)
    return quantize_rowwise_reference(w)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted unique indices of the columns of x [M, K] holding any |x| >= threshold.

    ``threshold <= 0`` turns the outlier decomposition off: the result is empty.
    """
    if use_triton(x):
        return outlier_columns_triton(x, threshold)
    return outlier_columns_reference(x, threshold)


def quantize_tokenwise(
    x: torch.Tensor, outlier_cols: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (int8 codes [M, K], float32 row absmax [M]).

    The absmax of each row ignores ``outlier_cols`` and their codes are 0: those columns take
    the 16-bit path in the layer.
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
