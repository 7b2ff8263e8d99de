"""Block-wise 8-bit quantization: one float32 absmax per block, nearest code of a 256-entry map.

A tensor of any shape is flattened and cut into blocks of ``block_size`` elements (the last block
may be ragged). Each block stores ``absmax = max |x|`` in float32 and, per element, the uint8 index
of the map code nearest to ``x / absmax``. Nearest is decided against the float32 midpoints between
neighbouring codes (``code_midpoints``), so the reference and the Triton kernel agree bit for bit
whenever they compute the same ``x / absmax``.
"""

from __future__ import annotations

import functools

import torch

from bytetune.kernels import _ops, gpu_arch
from bytetune.kernels.dispatch import HAS_TRITON, launch_device, require_triton
from bytetune.kernels.quant_maps import N_CODES, code_midpoints

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.dispatch import abs_bits, float_from_bits

DEFAULT_BLOCK_SIZE = 256
SUPPORTED_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def check_block_size(block_size: int) -> None:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(
            f"block_size={block_size} is not supported; use a power of two in {SUPPORTED_BLOCK_SIZES} "
            f"(256 is the default, 2048 the paper's choice)"
        )


def n_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def _check_map(code_map: torch.Tensor) -> None:
    if code_map.shape != (N_CODES,) or code_map.dtype != torch.float32:
        raise ValueError(
            f"code_map must be a float32 tensor of {N_CODES} sorted codes, got {tuple(code_map.shape)} "
            f"{code_map.dtype}; build it with bytetune.kernels.quant_maps.dynamic_map"
        )


# ---------------------------------------------------------------- PyTorch reference


def _as_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """[n_blocks, block_size] view of a flat tensor, zero-padded at the end (zeros never change a
    block's absmax and their codes are dropped again)."""
    pad = n_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def quantize_blocks_reference(
    blocks: torch.Tensor, midpoints: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an fp32 [n_blocks, block] tensor: (uint8 codes, float32 absmax per block)."""
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block has absmax 0; dividing by 1 instead maps it to the exact code of 0.
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return nearest_code_reference(blocks / scale[:, None], midpoints), absmax


@functools.lru_cache(maxsize=8)
def _nearest_code_table(midpoint_bytes: bytes) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per bin of floats sharing their top 16 bits (sign, exponent, 7 mantissa bits): the number of
    midpoints below the bin and the next midpoint. None when some bin holds two midpoints (not so
    for the dynamic or linear maps: their codes are further apart than a bin is wide).
    Entry ``j`` is the bin whose top 16 bits, read as a signed int16, are ``j - 2**15``: an
    arithmetic shift of the float's int32 bits plus ``2**15`` indexes it (int32, no int64 copy)."""
    midpoints = torch.frombuffer(bytearray(midpoint_bytes), dtype=torch.float32)
    first_bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int64) << 16

    def as_float32(bits: torch.Tensor) -> torch.Tensor:
        return bits.to(torch.int32).view(torch.float32)

    first, last = as_float32(first_bits), as_float32(first_bits + 0xFFFF)
    # The bins of +-inf end in NaN bit patterns, which must not hide the infinity.
    last = torch.where(torch.isnan(last), first, last)
    below_bin = torch.bucketize(torch.minimum(first, last), midpoints)
    if (torch.bucketize(torch.maximum(first, last), midpoints) - below_bin).max() > 1:
        return None
    next_midpoint = torch.cat([midpoints, midpoints.new_full((1,), float("inf"))])[below_bin]
    # Bins above the last midpoint: "254, and every value is greater than -inf" (= 255) keeps the
    # sign test of nearest_code_reference free of inf - inf.
    above_all = below_bin == len(midpoints)
    below_bin[above_all] -= 1
    next_midpoint[above_all] = -float("inf")
    return below_bin.to(torch.uint8), next_midpoint


def nearest_code_reference(normalized: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest code: the number of midpoints strictly below each fp32 value,
    exactly ``torch.bucketize(normalized, midpoints)`` for every value but NaN (never a state: a
    non-finite gradient zeroes its states), and 7x faster on CPU, where bucketize searches per
    element. A value's top 16 bits pick its bin in a table; one comparison with the bin's
    midpoint finishes it."""
    table = _nearest_code_table(midpoints.detach().cpu().numpy().tobytes())
    if table is None:
        return torch.bucketize(normalized, midpoints).to(torch.uint8)
    below_bin, next_midpoint = (t.to(normalized.device) for t in table)
    flat = normalized.contiguous().view(-1)
    bins = flat.view(torch.int32).bitwise_right_shift(16).add_(1 << 15)
    # value > next midpoint <=> next - value < 0: its sign bit, as 0 or 255 (= -1 in uint8), is
    # cheaper on CPU than torch.gt's bool tensor. Equal values give +0: not greater, as bucketize.
    greater = torch.sub(next_midpoint.index_select(0, bins), flat).view(torch.int32)
    greater = greater.bitwise_right_shift_(31).to(torch.uint8)
    return below_bin.index_select(0, bins).sub_(greater).view(normalized.shape)


def dequantize_blocks_reference(
    codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor
) -> torch.Tensor:
    # index_select with int32 indices: ~3x faster on CPU than code_map[codes.long()].
    values = code_map.index_select(0, codes.reshape(-1).int()).view(codes.shape)
    return values.mul_(absmax[:, None])


def quantize_blockwise_reference(
    x: torch.Tensor, code_map: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    check_block_size(block_size)
    _check_map(code_map)
    flat = x.detach().reshape(-1).float()
    codes, absmax = quantize_blocks_reference(_as_blocks(flat, block_size), code_midpoints(code_map))
    return codes.reshape(-1)[: x.numel()].reshape(x.shape), absmax


def dequantize_blockwise_reference(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code_map: torch.Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    check_block_size(block_size)
    _check_map(code_map)
    blocks = _as_blocks(codes.reshape(-1), block_size)
    values = dequantize_blocks_reference(blocks, absmax, code_map)
    return values.reshape(-1)[: codes.numel()].reshape(codes.shape).to(dtype)


# ---------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def nearest_code(normalized, midpoints_ptr):
        """Index of the nearest code: the number of the 255 sorted midpoints strictly below the
        value, found by an 8-step binary search (128 + 64 + ... + 1 = 255)."""
        code = tl.zeros(normalized.shape, dtype=tl.int32)
        for level in tl.static_range(8):
            step = 128 >> level
            midpoint = tl.load(midpoints_ptr + code + (step - 1))
            code = tl.where(normalized > midpoint, code + step, code)
        return code

    @triton.jit
    def _quantize_blockwise_kernel(
        x_ptr, codes_ptr, absmax_ptr, midpoints_ptr, numel, BLOCK_SIZE: tl.constexpr
    ):
        block = tl.program_id(0)
        offsets = block.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_bounds = offsets < numel
        x = tl.load(x_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        # NaN-keeping absmax (abs_bits): a NaN block stores a NaN absmax, as the reference does.
        absmax = float_from_bits(tl.max(abs_bits(x), axis=0))
        scale = tl.where(absmax > 0, absmax, 1.0)
        # div_rn: IEEE division, as torch's (fp32 `/` compiles to the approximate div.full.f32).
        code = nearest_code(tl.div_rn(x, scale), midpoints_ptr)
        tl.store(codes_ptr + offsets, code.to(tl.uint8), mask=in_bounds)
        tl.store(absmax_ptr + block, absmax)

    @triton.jit
    def _dequantize_blockwise_kernel(
        codes_ptr, absmax_ptr, map_ptr, out_ptr, numel, BLOCK_SIZE: tl.constexpr
    ):
        block = tl.program_id(0)
        offsets = block.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_bounds = offsets < numel
        code = tl.load(codes_ptr + offsets, mask=in_bounds, other=0).to(tl.int32)
        value = tl.load(map_ptr + code) * tl.load(absmax_ptr + block)
        tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=in_bounds)


def num_warps_for(block_size: int, cap: int = 8) -> int:
    """Warps per program of the element-wise kernels: 128 elements per warp (4 per thread), at
    most ``cap``. With the default 4 warps, fp32 blocks of 2048-4096 spilled in the compile gate."""
    return max(1, min(cap, block_size // 128))


# Where the compile gate saw an element-wise config spill under one Triton release:
# (kernel, block size, warps) -> gpu_arch.Tile.spills_on. On sm_90 triton 3.6 and 3.8 give the
# quantize kernel over 4096 elements and 8 warps an 8-byte stack (3.9 does not), and 3.6 gives
# Adam's update one over 256 elements and 2 warps and over 512 and 4; twice the warps do not.
ELEMENTWISE_SPILLS: dict[tuple[str, int, int], tuple[tuple[str, int], ...]] = {
    ("quantize_blockwise", 4096, 8): (("3.6", 90), ("3.8", 90)),
    ("optimizer_update_adam", 256, 2): (("3.6", 90),),
    ("optimizer_update_adam", 512, 4): (("3.6", 90),),
    # momentum's update over 4096 elements and 8 warps: 3.6 on sm_75 (bf16 params, 8-16 bytes),
    # 3.8 on sm_86/89/90 (fp32 params)
    ("optimizer_update_momentum", 4096, 8): (("3.6", 75), ("3.8", 86), ("3.8", 89), ("3.8", 90)),
}


def elementwise_tiles(kernel: str, block_size: int, cap: int = 8) -> list[gpu_arch.Tile]:
    """The configs a launch of the element-wise ``kernel`` over ``block_size`` tries, in order:
    :func:`num_warps_for`'s, then (only while the last one spills somewhere) twice and half its
    warps. The compile gate checks the same list."""
    first = num_warps_for(block_size, cap)
    tiles = []
    for warps in (first, first * 2, first // 2):
        if warps < 1 or warps > 16 or (tiles and not tiles[-1].spills_on):
            continue
        spills = ELEMENTWISE_SPILLS.get((kernel, block_size, warps), ())
        tiles.append(gpu_arch.tile(BLOCK_SIZE=block_size, num_warps=warps, spills_on=spills))
    return tiles


def elementwise_tile(kernel: str, block_size: int, device: torch.device, cap: int = 8) -> gpu_arch.Tile:
    """The config ``kernel`` launches with on ``device``: the first of :func:`elementwise_tiles`
    that :func:`gpu_arch.launchable` keeps there (the first one off CUDA)."""
    tiles = elementwise_tiles(kernel, block_size, cap)
    arch = gpu_arch.device_arch(device)
    return tiles[0] if arch is None else gpu_arch.first_launchable(tiles, *arch)


def quantize_blockwise_triton(
    x: torch.Tensor, code_map: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    check_block_size(block_size)
    _check_map(code_map)
    flat = x.detach().contiguous().reshape(-1)
    numel = flat.numel()
    codes = torch.empty(numel, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks(numel, block_size), dtype=torch.float32, device=x.device)
    if numel:
        with launch_device(flat):
            _quantize_blockwise_kernel[(absmax.numel(),)](
                flat, codes, absmax, code_midpoints(code_map), numel, BLOCK_SIZE=block_size,
                num_warps=elementwise_tile("quantize_blockwise", block_size, x.device).num_warps,
            )
    return codes.reshape(x.shape), absmax


def dequantize_blockwise_triton(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code_map: torch.Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    require_triton()
    check_block_size(block_size)
    _check_map(code_map)
    flat = codes.contiguous().reshape(-1)
    out = torch.empty(flat.numel(), dtype=dtype, device=codes.device)
    if flat.numel():
        with launch_device(flat):
            _dequantize_blockwise_kernel[(absmax.numel(),)](
                flat, absmax, code_map, out, flat.numel(), BLOCK_SIZE=block_size,
                num_warps=elementwise_tile("dequantize_blockwise", block_size, codes.device).num_warps,
            )
    return out.reshape(codes.shape)


# ---------------------------------------------------------------- public ops


def quantize_blockwise(
    x: torch.Tensor, code_map: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, fp32/bf16/fp16) to (uint8 codes shaped like ``x``, float32
    absmax per block of ``block_size`` flattened elements)."""
    return _ops.quantize_blockwise(x, code_map, block_size)


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code_map: torch.Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code_map[codes] * absmax`` of each block."""
    return _ops.dequantize_blockwise(codes, absmax, code_map, block_size, dtype)
