"""ZeroQuant kernels (arXiv 2206.01861): group-wise weights, token-wise activations.

Conventions, shared by the Triton kernels and the PyTorch references:

- Weight [N, K] (out, in) is split along K into groups of ``group_size`` columns; each (row, group)
  has one float32 scale ``absmax / qmax``: ``scales`` is [N, ceil(K / group_size)]. A ragged last
  group (K not a multiple of group_size) is allowed and simply has fewer columns: SmolLM2's hidden
  size 576 is not a multiple of the default 128, and padding the weight would waste bytes.
- INT8 codes are in [-127, 127] (int8 [N, K]). INT4 codes are in [-7, 7], symmetric so that the
  grid is the same for both signs; they are stored as ``code + 8`` in a nibble, two per uint8
  along K (column 2j in the low nibble, 2j+1 in the high one): uint8 [N, K // 2], K even.
- Weight rounding is half away from zero, ``code = sign(v) * floor(|v| + 0.5)`` with ``v = w * (qmax /
  absmax)``; both sides compute the reciprocal with a correctly rounded division so that the
  kernels and references agree bit for bit.
- Activations [M, K] are quantized per token (row) by :mod:`bytetune.kernels.llm_int8`'s
  ``quantize_tokenwise`` (its rounding, half to even), with the scale as the step absmax / 127
  (:func:`quantize_tokenwise_step`).
- GEMM: for each K-group, the partial product of the codes (int32 for int8 activations, float32
  otherwise) is scaled by that group's weight scale in float32 and summed over groups; int8
  activations then multiply by their token scale. Input gradients dequantize weight tiles in
  registers: the 16-bit weight never exists in memory.
"""

from __future__ import annotations

import torch

from bytetune.kernels import _ops, gpu_arch, llm_int8
from bytetune.kernels.constants import INT8_MAX
from bytetune.kernels.cpu_int8_gemm import int32_matmul_nt
from bytetune.kernels.dispatch import HAS_TRITON, launch_device, require_triton, round_half_away
from bytetune.kernels.gpu_arch import Tile, tile

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.dispatch import abs_bits, float_from_bits

INT4_MAX = 7
INT4_OFFSET = 8  # stored nibble = code + 8, so codes -7..7 become 1..15
DEFAULT_GROUP_SIZE = 128
SUPPORTED_BITS = (8, 4)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The reference input gradient dequantizes at most this many weight elements at a time (2 MiB of
# fp32), so it never holds an fp32 copy of a large weight; llm_int8's reference does the same.
_REFERENCE_GRAD_CHUNK_ELEMENTS = 1 << 19


def qmax_for(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return INT8_MAX if bits == 8 else INT4_MAX


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


# ----------------------------------------------------------------------------------------------
# Argument checks (shared by both paths, so bad input fails the same way on CPU and GPU)
# ----------------------------------------------------------------------------------------------


def _check_group_size(group_size: int, bits: int) -> None:
    if not isinstance(group_size, int) or group_size < 32 or group_size % 32 != 0:
        raise ValueError(
            f"group_size must be a positive multiple of 32 (the GEMM's K tile, the smallest an int8 "
            f"tensor-core dot takes), got {group_size}; use e.g. 64 or 128"
        )
    qmax_for(bits)


def _check_weight(weight: torch.Tensor, bits: int, group_size: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float32/float16/bfloat16, got {weight.dtype}")
    _check_group_size(group_size, bits)
    if bits == 4 and weight.shape[1] % 2 != 0:
        raise ValueError(
            f"INT4 packs two codes per byte along the input dim, which must be even; got {weight.shape[1]}. "
            "Use bits=8 for this layer"
        )


def _check_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int) -> None:
    _check_group_size(group_size, bits)
    expected_dtype, expected_cols = (torch.int8, in_features) if bits == 8 else (torch.uint8, in_features // 2)
    if codes.dtype != expected_dtype or codes.dim() != 2 or codes.shape[1] != expected_cols:
        raise ValueError(
            f"{bits}-bit codes for in_features={in_features} must be {expected_dtype} [out, {expected_cols}], "
            f"got {codes.dtype} {tuple(codes.shape)}"
        )
    expected_scales = (codes.shape[0], num_groups(in_features, group_size))
    if scales.dtype != torch.float32 or tuple(scales.shape) != expected_scales:
        raise ValueError(f"scales must be float32 {expected_scales}, got {scales.dtype} {tuple(scales.shape)}")
    if scales.device != codes.device:
        raise ValueError(f"codes on {codes.device} and scales on {scales.device}: move them to one device")


def _check_activation(x: torch.Tensor, x_scale: torch.Tensor | None, in_features: int) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be 2-D [tokens, {in_features}], got shape {tuple(x.shape)}")
    if x_scale is None:
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"float activations must be float32/float16/bfloat16, got {x.dtype}")
    else:
        if x.dtype != torch.int8:
            raise TypeError(f"x with an x_scale must hold int8 codes (quantize_tokenwise), got {x.dtype}")
        if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (x.shape[0],):
            raise ValueError(f"x_scale must be float32 [{x.shape[0]}], got {x_scale.dtype} {tuple(x_scale.shape)}")


def _reciprocal_scale(absmax: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, qmax / absmax) in float32; an all-zero group gets scale 1 and codes 0, a NaN
    group (``!= 0``, not ``> 0``) a NaN scale."""
    nonzero = absmax != 0
    safe = torch.where(nonzero, absmax, torch.ones_like(absmax))
    qmax_t = torch.full_like(safe, qmax)
    # Tensor / tensor: torch computes `scalar / tensor` as a reciprocal times the scalar, which is
    # not correctly rounded and would disagree with the kernels' div_rn on some ties.
    return torch.where(nonzero, safe / qmax_t, torch.ones_like(absmax)), qmax_t / safe


# ----------------------------------------------------------------------------------------------
# PyTorch references
# ----------------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int codes in [-7, 7], [N, K] with K even -> uint8 [N, K // 2] (low nibble = even column)."""
    nibbles = (codes.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 codes [N, K]."""
    low = (packed & 0xF).to(torch.int8) - INT4_OFFSET
    high = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def _group_view(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, groups, group_size], zero-padding a ragged last group (zeros change no absmax)."""
    n, k = t.shape
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(n, -1, group_size)


def expand_group_scales(scales: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[N, groups] -> [N, in_features]: each column gets its group's scale."""
    return scales.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_groupwise_reference(
    weight: torch.Tensor, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_weight(weight, bits, group_size)
    qmax = qmax_for(bits)
    n, k = weight.shape
    grouped = _group_view(weight.float(), group_size)
    scales, inv = _reciprocal_scale(grouped.abs().amax(dim=2), qmax)
    codes = round_half_away(grouped * inv[:, :, None]).clamp_(-qmax, qmax)
    codes = codes.reshape(n, -1)[:, :k].to(torch.int8)
    return (codes if bits == 8 else pack_int4(codes)), scales


def dequantize_groupwise(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int, dtype=torch.float32
) -> torch.Tensor:
    """The float [N, K] weight the codes stand for (computed in float32). A plain-PyTorch helper for
    references, export and tests: the kernels never call it."""
    _check_codes(codes, scales, bits, group_size, in_features)
    ints = codes if bits == 8 else unpack_int4(codes)
    return (ints.float() * expand_group_scales(scales, group_size, in_features)).to(dtype)


def groupwise_matmul_reference(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = sum_g (x_g @ codes_g.T) * scales[:, g]  (* x_scale per token)  + bias."""
    in_features = x.shape[1]
    _check_activation(x, x_scale, in_features)
    _check_codes(codes, scales, bits, group_size, in_features)
    out_dtype = out_dtype or (torch.float32 if x_scale is not None else x.dtype)
    # INT4 codes are unpacked per call: [N, K] int8, the size of an INT8 weight, freed on return.
    ints = codes if bits == 8 else unpack_int4(codes)
    acc = torch.zeros(x.shape[0], ints.shape[0], dtype=torch.float32, device=x.device)
    if x_scale is not None:
        # W8A8 / W4A8: one exact int32 GEMM per K-group (the CPU's int8 GEMM), the kernel's int32
        # accumulator; the group's scale applies to its integer sum, so a GEMM never spans groups.
        for g in range(scales.shape[1]):
            cols = slice(g * group_size, min((g + 1) * group_size, in_features))
            acc.addcmul_(int32_matmul_nt(x[:, cols], ints[:, cols]), scales[:, g])
        acc.mul_(x_scale[:, None])
    else:
        ints = ints.float()
        xf = x.float()
        for g in range(scales.shape[1]):
            cols = slice(g * group_size, min((g + 1) * group_size, in_features))
            acc.addcmul_(xf[:, cols] @ ints[:, cols].t(), scales[:, g])
    if bias is not None:
        acc += bias.float()
    return acc.to(out_dtype)


def groupwise_matmul_grad_input_reference(
    grad_y: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int
) -> torch.Tensor:
    """grad_x = grad_y @ dequant(W), in grad_y's dtype; the weight is dequantized a chunk of rows
    at a time."""
    _check_codes(codes, scales, bits, group_size, in_features)
    if grad_y.dim() != 2 or grad_y.shape[1] != codes.shape[0]:
        raise ValueError(f"grad_y must be [tokens, {codes.shape[0]}], got shape {tuple(grad_y.shape)}")
    (m, n), k = grad_y.shape, in_features
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, k, dtype=grad_y.dtype, device=grad_y.device)
    grad_x = torch.empty(m, k, dtype=torch.float32, device=grad_y.device)
    grad_y32 = grad_y.float()
    rows_per_chunk = max(1, _REFERENCE_GRAD_CHUNK_ELEMENTS // k)
    w_chunk_buffer = torch.empty(min(rows_per_chunk, n), k, dtype=torch.float32, device=grad_y.device)
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        ints = codes[start:stop] if bits == 8 else unpack_int4(codes[start:stop])
        w_chunk = w_chunk_buffer[: stop - start]
        w_chunk.copy_(ints)  # convert, then scale in place: faster than a mixed-dtype multiply
        for g in range(scales.shape[1]):
            cols = slice(g * group_size, min((g + 1) * group_size, k))
            w_chunk[:, cols].mul_(scales[start:stop, g : g + 1])
        if start == 0:  # the first chunk writes grad_x: no zero-fill, no read-back
            torch.mm(grad_y32[:, start:stop], w_chunk, out=grad_x)
        else:
            grad_x.addmm_(grad_y32[:, start:stop], w_chunk)
    return grad_x.to(grad_y.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _round_half_away_tl(v):
        return tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))

    @triton.jit
    def _quantize_groupwise_kernel(
        w_ptr, codes_ptr, scales_ptr, K, num_groups, stride_w, stride_codes,
        QMAX: tl.constexpr, INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, HALF_BLOCK: tl.constexpr,
    ):
        # One program per (row, group). Even and odd columns are loaded separately so that an INT4
        # pair lands in one byte without shuffling registers.
        row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 on large weights
        group = tl.program_id(1)
        pair = tl.arange(0, HALF_BLOCK)
        col_even = group * GROUP_SIZE + 2 * pair
        col_odd = col_even + 1
        in_group = 2 * pair < GROUP_SIZE
        mask_even = in_group & (col_even < K)
        mask_odd = in_group & (col_odd < K)
        w_row = w_ptr + row * stride_w
        even = tl.load(w_row + col_even, mask=mask_even, other=0.0).to(tl.float32)
        odd = tl.load(w_row + col_odd, mask=mask_odd, other=0.0).to(tl.float32)
        # NaN-keeping absmax (abs_bits); `!= 0`, not `> 0`, so that a NaN group gets a NaN scale.
        absmax = float_from_bits(tl.maximum(tl.max(abs_bits(even), axis=0), tl.max(abs_bits(odd), axis=0)))
        safe = tl.where(absmax != 0, absmax, 1.0)
        inv = tl.div_rn(tl.full((), QMAX, tl.float32), safe)
        scale = tl.where(absmax != 0, tl.div_rn(safe, tl.full((), QMAX, tl.float32)), 1.0)
        tl.store(scales_ptr + row * num_groups + group, scale)
        code_even = tl.minimum(tl.maximum(_round_half_away_tl(even * inv), -QMAX), QMAX)
        code_odd = tl.minimum(tl.maximum(_round_half_away_tl(odd * inv), -QMAX), QMAX)
        codes_row = codes_ptr + row * stride_codes
        if INT4:
            packed = (code_even.to(tl.int32) + 8) | ((code_odd.to(tl.int32) + 8) << 4)
            tl.store(codes_row + col_even // 2, packed.to(tl.uint8), mask=mask_even)
        else:
            tl.store(codes_row + col_even, code_even.to(tl.int8), mask=mask_even)
            tl.store(codes_row + col_odd, code_odd.to(tl.int8), mask=mask_odd)

    @triton.jit
    def _row_offsets(rows, stride):
        """Element offsets of row starts, in int64: M * N reaches 2^31 (BLOOM-176B's dense_h_to_4h
        output at ~37k tokens), where an int32 product wraps."""
        return rows.to(tl.int64) * stride

    @triton.jit
    def _load_weight_codes_kt(codes_ptr, stride_codes, rows, cols, mask, INT4: tl.constexpr):
        """Codes for a [BLOCK_K, BLOCK_N] tile (cols along dim 0, rows along dim 1) as int8.

        INT4: each column reads its byte (two neighbours share one, served from cache) and shifts
        out its nibble in registers."""
        if INT4:
            byte = tl.load(codes_ptr + _row_offsets(rows, stride_codes)[None, :] + cols[:, None] // 2, mask=mask, other=136)
            nibble = (byte.to(tl.int32) >> ((cols[:, None] % 2) * 4)) & 0xF
            return (nibble - 8).to(tl.int8)
        else:
            return tl.load(codes_ptr + _row_offsets(rows, stride_codes)[None, :] + cols[:, None], mask=mask, other=0)

    @triton.jit
    def _groupwise_matmul_kernel(
        x_ptr, x_scale_ptr, codes_ptr, scales_ptr, bias_ptr, y_ptr,
        M, N, K, M_BUCKET, num_groups, stride_x, stride_codes, stride_y,
        GROUP_SIZE: tl.constexpr, INT4: tl.constexpr, X_INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
        FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # M_BUCKET (next power of two of M) is only an autotuning key.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rows_m < M
        mask_n = rows_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, num_groups):
            if X_INT8:
                partial = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            else:
                partial = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kk in range(0, GROUP_SIZE, BLOCK_K):
                cols = g * GROUP_SIZE + kk + tl.arange(0, BLOCK_K)
                mask_k = cols < K
                x = tl.load(x_ptr + _row_offsets(rows_m, stride_x)[:, None] + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
                w = _load_weight_codes_kt(codes_ptr, stride_codes, rows_n, cols, mask_k[:, None] & mask_n[None, :], INT4)
                if X_INT8:
                    partial += tl.dot(x, w, out_dtype=tl.int32)
                elif FP32_DOT:
                    partial += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    # Integers up to 127 are exact in bf16/fp16: the codes convert without loss.
                    partial += tl.dot(x, w.to(x.dtype), out_dtype=tl.float32)
            group_scale = tl.load(scales_ptr + _row_offsets(rows_n, num_groups) + g, mask=mask_n, other=0.0)
            acc += partial.to(tl.float32) * group_scale[None, :]
        if X_INT8:
            acc *= tl.load(x_scale_ptr + rows_m, mask=mask_m, other=0.0)[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + _row_offsets(rows_m, stride_y)[:, None] + rows_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _groupwise_grad_input_kernel(
        grad_y_ptr, codes_ptr, scales_ptr, grad_x_ptr,
        M, N, K, M_BUCKET, num_groups, stride_gy, stride_codes, stride_gx,
        GROUP_SIZE: tl.constexpr, INT4: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # grad_x[m, k] = sum_n grad_y[m, n] * scale[n, k // GROUP_SIZE] * code[n, k]; the scale
        # varies along the reduction, so each [BLOCK_N, BLOCK_K] tile (inside one group, since
        # BLOCK_K divides GROUP_SIZE) is dequantized in registers before the dot.
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = rows_m < M
        mask_k = cols < K
        group = (pid_k * BLOCK_K) // GROUP_SIZE
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = rows_n < N
            gy = tl.load(grad_y_ptr + _row_offsets(rows_m, stride_gy)[:, None] + rows_n[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            codes_kn = _load_weight_codes_kt(codes_ptr, stride_codes, rows_n, cols, mask_k[:, None] & mask_n[None, :], INT4)
            scale = tl.load(scales_ptr + _row_offsets(rows_n, num_groups) + group, mask=mask_n, other=0.0)
            w = tl.trans(codes_kn).to(tl.float32) * scale[:, None]
            if FP32_DOT:
                acc += tl.dot(gy.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(gy, w.to(gy.dtype), out_dtype=tl.float32)
        tl.store(grad_x_ptr + _row_offsets(rows_m, stride_gx)[:, None] + cols[None, :], acc.to(grad_x_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


def _needs_fp32_dot(t: torch.Tensor) -> bool:
    # float32 operands: full-precision dot ("ieee", not TF32), as an fp32 model expects.
    # bfloat16 on CPU: triton 3.9's interpreter returns garbage from tl.dot on bf16 operands
    # (loads and stores are fine), so the dot runs in float32; compiled GPU kernels keep bf16.
    return t.dtype == torch.float32 or (t.dtype == torch.bfloat16 and not t.is_cuda)


# Launch configs (checked for every GPU generation by bench/gpu_compile.py). A K tile never
# straddles two groups: BLOCK_K must divide group_size (a multiple of 32), so each menu has
# BLOCK_K = 32 entries for group sizes like 96. Thin-M tiles serve decoding (few tokens). The GEMM
# holds two [BLOCK_M, BLOCK_N] accumulators (the group's partial sum and the total): the gate
# saw 64x128 with 4 warps and 128x128 with 8 warps spill (16-152 B), so those have 8 warps and
# a 64-wide N tile now. Under triton 3.6 (W4 weights) 32x128x64 spills from sm_80 to sm_90,
# 64x128x64 and 64x64x64 on sm_80, and the input gradient's 16x64x64 on sm_80 and 64x64x128 on sm_86/89.
MATMUL_TILES = [
    tile(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    tile(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, spills_on=(("3.6", 0),)),
    tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3, spills_on=(("3.6", 80),)),
    tile(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, spills_on=(("3.6", 80),)),
    tile(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
    tile(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
]
# Input gradient: BLOCK_N is the reduction tile, BLOCK_K the output columns (inside one group).
GRAD_INPUT_TILES = [
    tile(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3, spills_on=(("3.6", 80),)),
    tile(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3),  # 4 warps spilled on sm_80
    tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, spills_on=(("3.6", 86), ("3.6", 89))),
    tile(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=3),
    tile(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
]
# fp32 operands: the "ieee" dot runs on FMA units, and the tiles above spill with it (the gate
# measured 1.5-4 KB of stack at 64x64x64); these small ones do not. BLOCK_K = 32 divides any group.
MATMUL_TILES_FP32 = [
    tile(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    tile(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
]
GRAD_INPUT_TILES_FP32 = [
    tile(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
    tile(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
]
# BYTETUNE_AUTOTUNE=0 on a GPU: one tile per BLOCK_K, so test shapes skip the tuning sweep; the
# first of its candidates that launches there. Under triton 3.6 on sm_80 the 64x64x64 tile spills
# with W4 weights (16-64 bytes, bf16/fp16 GEMM), so there the group is read in K tiles of 32 (32
# divides every group size).
FIXED_GPU_TILES = {
    64: [tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, spills_on=(("3.6", 80),)), tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)],
    32: [tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)],
}
FIXED_GPU_TILE_FP32 = tile(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3)
# The interpreter (CPU tensors): small tiles keep the tests fast.
_INTERPRETER_TILES = {64: tile(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64), 32: tile(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)}
# The weight quantizer's tile is the group (one program per row and group): the gate compiles it
# for the smallest group, the default and a large one.
QUANTIZE_GROUP_SIZES = (32, DEFAULT_GROUP_SIZE, 1024)


def _block_k(group_size: int) -> int:
    return 64 if group_size % 64 == 0 else 32


def matmul_shared_bytes(config: Tile, x_bytes: int) -> int:
    """Upper bound of the GEMM's shared memory: per stage an x tile and a weight tile (staged as
    x's dtype), or the fp32 output tile."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    return max(config.num_stages * (bm * bk + bk * bn) * x_bytes, bm * bn * 4)


def grad_input_shared_bytes(config: Tile, grad_bytes: int) -> int:
    """Upper bound for the input gradient: per stage a grad_y tile and a dequantized weight tile,
    or the fp32 output tile."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    return max(config.num_stages * (bm * bn + bn * bk) * max(grad_bytes, 2), bm * bk * 4)


def _tiles_for_launch(tiles: list[Tile], configs: list, m_bucket: int, group_size: int, device, shared_bytes) -> list:
    """The autotune prune: K tiles that divide the group, thin tiles only for few tokens (and
    no thin tiles for many), then what this GPU generation can run."""
    few_tokens = m_bucket <= 32
    keep = [
        t for t in tiles
        if group_size % t["BLOCK_K"] == 0 and (t["BLOCK_M"] <= 32) == few_tokens
    ]  # fmt: skip
    arch = gpu_arch.device_arch(device)
    if arch is not None:
        keep = gpu_arch.prune(keep, *arch, shared_bytes)
    keys = {t.key() for t in keep}
    return [c for c in configs if gpu_arch.config_key(c) in keys]


def _prune_matmul_configs(configs, named_args, **kwargs):
    x_bytes = 1 if kwargs["X_INT8"] else named_args["x_ptr"].element_size()
    return _tiles_for_launch(
        MATMUL_TILES_FP32 if kwargs["FP32_DOT"] else MATMUL_TILES, configs, named_args["M_BUCKET"], kwargs["GROUP_SIZE"], named_args["x_ptr"].device,
        lambda t: matmul_shared_bytes(t, x_bytes),
    )  # fmt: skip


def _prune_grad_input_configs(configs, named_args, **kwargs):
    grad_bytes = named_args["grad_y_ptr"].element_size()
    return _tiles_for_launch(
        GRAD_INPUT_TILES_FP32 if kwargs["FP32_DOT"] else GRAD_INPUT_TILES, configs, named_args["M_BUCKET"], kwargs["GROUP_SIZE"], named_args["grad_y_ptr"].device,
        lambda t: grad_input_shared_bytes(t, grad_bytes),
    )  # fmt: skip


if HAS_TRITON:
    _groupwise_matmul_tuned = triton.autotune(
        configs=gpu_arch.triton_configs(MATMUL_TILES + MATMUL_TILES_FP32),
        key=["M_BUCKET", "N", "K", "GROUP_SIZE", "INT4", "X_INT8", "HAS_BIAS", "FP32_DOT"],
        prune_configs_by={"early_config_prune": _prune_matmul_configs},
    )(_groupwise_matmul_kernel)
    _groupwise_grad_input_tuned = triton.autotune(
        configs=gpu_arch.triton_configs(GRAD_INPUT_TILES + GRAD_INPUT_TILES_FP32),
        key=["M_BUCKET", "N", "K", "GROUP_SIZE", "INT4", "FP32_DOT"],
        prune_configs_by={"early_config_prune": _prune_grad_input_configs},
    )(_groupwise_grad_input_kernel)


def _launch(kernel, tuned, grid, args, constexprs: dict, on_gpu: bool, block_k: int) -> None:
    """Autotuned on a GPU (unless BYTETUNE_AUTOTUNE=0), a fixed tile otherwise; on the GPU of
    ``args[0]`` (every tensor of a launch is on one device)."""
    with launch_device(args[0]):
        if on_gpu and gpu_arch.autotune_enabled():
            tuned[grid](*args, **constexprs)
            return
        if on_gpu:
            config = gpu_arch.first_launchable(FIXED_GPU_TILES[block_k], *gpu_arch.device_arch(args[0].device))
        else:
            config = _INTERPRETER_TILES[block_k]
        if on_gpu and constexprs["FP32_DOT"]:
            config = FIXED_GPU_TILE_FP32
        kernel[grid(config.kwargs)](*args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def quantize_groupwise_triton(
    weight: torch.Tensor, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    _check_weight(weight, bits, group_size)
    weight = weight.contiguous()
    n, k = weight.shape
    groups = num_groups(k, group_size)
    codes = torch.empty((n, k if bits == 8 else k // 2), dtype=torch.int8 if bits == 8 else torch.uint8, device=weight.device)
    scales = torch.empty((n, groups), dtype=torch.float32, device=weight.device)
    if n == 0 or k == 0:
        return codes, scales
    with launch_device(weight):
        _quantize_groupwise_kernel[(n, groups)](
            weight, codes, scales, k, groups, weight.stride(0), codes.stride(0),
            QMAX=qmax_for(bits), INT4=bits == 4, GROUP_SIZE=group_size,
            HALF_BLOCK=triton.next_power_of_2(group_size // 2),
        )
    return codes, scales


def groupwise_matmul_triton(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    require_triton()
    in_features = x.shape[1] if x.dim() == 2 else -1
    _check_activation(x, x_scale, in_features)
    _check_codes(codes, scales, bits, group_size, in_features)
    out_dtype = out_dtype or (torch.float32 if x_scale is not None else x.dtype)
    x, codes, scales = x.contiguous(), codes.contiguous(), scales.contiguous()
    m, n = x.shape[0], codes.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if not gpu_arch.dot_supported(x.device):
        return groupwise_matmul_reference(x, x_scale, codes, scales, bits, group_size, bias, out_dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _launch(
        _groupwise_matmul_kernel, _groupwise_matmul_tuned, grid,
        (x, x_scale if x_scale is not None else scales, codes, scales,
         bias.contiguous() if bias is not None else scales, y,
         m, n, in_features, gpu_arch.m_bucket(m), scales.shape[1], x.stride(0), codes.stride(0), y.stride(0)),
        dict(GROUP_SIZE=group_size, INT4=bits == 4, X_INT8=x_scale is not None, HAS_BIAS=bias is not None,
             FP32_DOT=_needs_fp32_dot(x)),
        x.is_cuda, _block_k(group_size),
    )  # fmt: skip
    return y


def groupwise_matmul_grad_input_triton(
    grad_y: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int
) -> torch.Tensor:
    require_triton()
    _check_codes(codes, scales, bits, group_size, in_features)
    if grad_y.dim() != 2 or grad_y.shape[1] != codes.shape[0] or grad_y.dtype not in FLOAT_DTYPES:
        raise ValueError(f"grad_y must be a float [tokens, {codes.shape[0]}], got {grad_y.dtype} {tuple(grad_y.shape)}")
    if not gpu_arch.dot_supported(grad_y.device):
        return groupwise_matmul_grad_input_reference(grad_y, codes, scales, bits, group_size, in_features)
    grad_y, codes, scales = grad_y.contiguous(), codes.contiguous(), scales.contiguous()
    m, n = grad_y.shape
    grad_x = torch.empty((m, in_features), dtype=grad_y.dtype, device=grad_y.device)
    if m == 0 or in_features == 0:
        return grad_x
    if n == 0:
        return grad_x.zero_()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(in_features, meta["BLOCK_K"]))  # noqa: E731
    _launch(
        _groupwise_grad_input_kernel, _groupwise_grad_input_tuned, grid,
        (grad_y, codes, scales, grad_x, m, n, in_features, gpu_arch.m_bucket(m), scales.shape[1],
         grad_y.stride(0), codes.stride(0), grad_x.stride(0)),
        dict(GROUP_SIZE=group_size, INT4=bits == 4, FP32_DOT=_needs_fp32_dot(grad_y)),
        grad_y.is_cuda, _block_k(group_size),
    )  # fmt: skip
    return grad_x


# ----------------------------------------------------------------------------------------------
# Public ops: the registered torch.ops.bytetune ops (kernels._ops; per device: kernels.backends)
# ----------------------------------------------------------------------------------------------


def quantize_groupwise(
    weight: torch.Tensor, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (codes, float32 scales [N, ceil(K / group_size)]); codes int8 [N, K] for
    bits=8, packed uint8 [N, K // 2] for bits=4."""
    return _ops.quantize_groupwise(weight, bits, group_size)


def quantize_tokenwise_step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [M, K] -> (int8 codes [M, K], float32 per-token steps [M] = absmax / 127).

    Named apart from :func:`bytetune.kernels.llm_int8.quantize_tokenwise`, which returns the
    absmax itself: ``value ~= code * step`` here, ``code * absmax / 127`` there.

    The codes are LLM.int8()'s (that op dispatches itself); only the scale differs, because the
    group-wise GEMM multiplies by a step rather than by absmax / 127. An all-zero token gets
    scale 1 / 127 (llm_int8's guard of 1, divided): its codes are 0, so its output is the bias.
    """
    codes, absmax = llm_int8.quantize_tokenwise(x)
    return codes, absmax / INT8_MAX


def groupwise_matmul(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x @ dequant(W).T + bias. ``x`` is int8 codes with per-token ``x_scale`` (W8A8 / W4A8), or
    float activations with ``x_scale=None`` (W8A16 / W4A16). Output dtype: ``out_dtype``, else
    x's dtype for float x and float32 for int8 x."""
    return _ops.groupwise_matmul(x, x_scale, codes, scales, bits, group_size, bias, out_dtype)


def groupwise_matmul_grad_input(
    grad_y: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int
) -> torch.Tensor:
    """grad_y @ dequant(W) in grad_y's dtype; the Triton path never materializes the weight."""
    return _ops.groupwise_matmul_grad_input(grad_y, codes, scales, bits, group_size, in_features)


def groupwise_linear_composite(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    act_bits: int,
) -> torch.Tensor:
    """GroupQuantLinear's forward from the ops above (every device's kernel of
    ``bytetune::groupwise_linear``): with ``act_bits=8`` x is first quantized per token to int8
    (W8A8 / W4A8), with ``act_bits=16`` it multiplies the codes as it is."""
    if act_bits == 8:
        x_codes, x_step = quantize_tokenwise_step(x)
        return groupwise_matmul(x_codes, x_step, codes, scales, bits, group_size, bias=bias, out_dtype=x.dtype)
    return groupwise_matmul(x, None, codes, scales, bits, group_size, bias=bias, out_dtype=x.dtype)


def groupwise_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    act_bits: int,
) -> torch.Tensor:
    """:func:`groupwise_linear_composite` with its parts' references called directly: the CPU
    kernel of ``bytetune::groupwise_linear``. The composite goes through the dispatcher once per
    part (quantize_tokenwise, groupwise_matmul), some 10-30 us each on CPU
    (bench/results/op_dispatch_cpu.md), which is most of a small layer's call."""
    if act_bits == 8:
        x_codes, absmax = llm_int8.quantize_tokenwise_reference(x)
        return groupwise_matmul_reference(x_codes, absmax / INT8_MAX, codes, scales, bits, group_size,
                                          bias=bias, out_dtype=x.dtype)
    return groupwise_matmul_reference(x, None, codes, scales, bits, group_size, bias=bias, out_dtype=x.dtype)


def groupwise_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    act_bits: int,
) -> torch.Tensor:
    """x [M, K] @ dequant(codes).T + bias in x's dtype (:func:`groupwise_linear_composite`),
    differentiable in x and bias: the input gradient is :func:`groupwise_matmul_grad_input`."""
    return _ops.groupwise_linear(x, codes, scales, bias, bits, group_size, act_bits)
