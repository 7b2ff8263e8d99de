"""Fused 8-bit optimizer updates: Adam/AdamW, momentum SGD (optionally Nesterov) and Lion.

One Triton program owns one block of ``block_size`` elements and, in a single pass over memory,
loads the gradient, the parameter and the uint8 state codes, dequantizes the states through the
256-entry code maps, updates states and parameter in fp32, takes the new per-block absmax of the
fp32 states, requantizes them (nearest code) and stores codes, absmax and parameter. The fp32
states only ever live in registers.

Many tensors, one launch: the update takes lists (the 8-bit params of one param group at one step
count). One launch per device and param dtype updates them all: program ``i`` owns block ``i`` of the
concatenation of the tensors and reads its tensor's addresses from a small table on the device
(cached while the tensors keep their addresses; the block -> tensor index depends only on the
sizes and is cached too), so a LoRA model's hundreds of small tensors cost one launch instead of
one each, and a step copies nothing to the device.

The parameter update uses the fp32 states before requantization (as in arXiv 2110.02861).

A state that divides the update (Adam's second moment) never requantizes to code 0 while
positive: its code book (:meth:`CodeBook.for_denominator`) puts the midpoint between 0 and the
smallest nonzero code at 0, so a value below half that code (about 1.6e-7 of its block's absmax,
reached by a gradient under ~4e-4 of the block's largest) takes the smallest code instead of 0.
Rounded to 0, a later zero gradient (a dead ReLU unit, a token absent from the batch) made the
update m_hat / eps, thousands of times the 32-bit step; rounded up, the element's next update can
only be smaller than the 32-bit rule's. The rule lives in the midpoints, so the kernel and the
reference, which search the same midpoints, apply it alike at no cost.

Non-finite gradients: an element whose gradient is inf or nan gets its optimizer states set to 0
and its parameter left unchanged (no weight decay either), so it can never poison the absmax and
hence the codes of the other elements of its block (bitsandbytes' rule).

The same update math, written in PyTorch, is the reference: ``optimizer_update_32bit`` runs it on
fp32 states (the 32-bit path) and ``optimizer_update_8bit_reference`` wraps it in block-wise
dequantize / quantize (the CPU 8-bit path and the tests' oracle). Both work piece by piece: the
small tensors of a list are concatenated into one flat buffer, each starting on a block
boundary, and updated together in cache-sized pieces, so the per-tensor Python overhead is a
few list entries, not a few dozen tensor ops.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools

import torch

from bytetune.kernels import _ops
from bytetune.kernels.blockwise import (
    DEFAULT_BLOCK_SIZE,
    HAS_TRITON,
    check_block_size,
    dequantize_blocks_reference,
    elementwise_tile,
    elementwise_tiles,
    n_blocks,
    num_warps_for as blockwise_num_warps,
    quantize_blocks_reference,
)
from bytetune.kernels.dispatch import launch_device, require_triton
from bytetune.kernels.quant_maps import code_midpoints

if HAS_TRITON:
    import triton
    import triton.language as tl

    from bytetune.kernels.blockwise import nearest_code
    from bytetune.kernels.dispatch import maximum_keeping_nan


class UpdateKind(enum.IntEnum):
    ADAM = 0  # two states: m (signed map) and v (unsigned map)
    MOMENTUM = 1  # one state: the momentum buffer (signed map)
    LION = 2  # one state: m (signed map)


N_STATES = {UpdateKind.ADAM: 2, UpdateKind.MOMENTUM: 1, UpdateKind.LION: 1}


@dataclasses.dataclass(frozen=True)
class UpdateScalars:
    """Per-step float scalars of the update, precomputed in float64 by the optimizer so both
    implementations see the same float32 values (a kernel computing ``1 - beta1`` in float32
    would round differently).

    Adam:     m = beta1 m + one_minus_beta1 g;  v = beta2 v + one_minus_beta2 g^2;
              p = p * param_decay - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)
    Momentum: buf = beta1 buf + one_minus_beta1 g  (beta1 = momentum, one_minus_beta1 =
              1 - dampening; 0 and 1 on the first step, where torch sets buf = g);
              p = p - lr * (g + momentum buf if Nesterov else buf)
    Lion:     p = p * param_decay - lr * sign(beta1 m + one_minus_beta1 g);
              m = beta2 m + one_minus_beta2 g
    Every kind first adds ``l2_decay * p`` to the gradient (torch's L2 weight decay).
    """

    lr: float = 0.0
    beta1: float = 0.0
    one_minus_beta1: float = 1.0
    beta2: float = 0.0
    one_minus_beta2: float = 1.0
    eps: float = 0.0
    l2_decay: float = 0.0
    param_decay: float = 1.0
    step_size: float = 0.0
    bias_correction2_sqrt: float = 1.0
    momentum: float = 0.0


@dataclasses.dataclass(frozen=True)
class CodeBook:
    """A 256-entry code map with its 255 midpoints (what the nearest-code search compares with).
    Built once per map and device by the optimizer, not on every step."""

    codes: torch.Tensor
    midpoints: torch.Tensor

    @classmethod
    def of(cls, code_map: torch.Tensor) -> CodeBook:
        return cls(code_map, code_midpoints(code_map))

    @classmethod
    def for_denominator(cls, code_map: torch.Tensor) -> CodeBook:
        """The book of a non-negative state that divides the update (Adam's v): nearest code,
        except that no positive value rounds to code 0 (the first midpoint is 0, and a value's
        code counts the midpoints strictly below it), so the update never divides by eps alone
        where the fp32 state was positive. Zero, and the zero padding of a ragged block, stay 0."""
        if float(code_map[0]) != 0.0 or float(code_map[1]) <= 0.0:
            raise ValueError("a denominator's code map must start at 0 followed by positive codes (the unsigned map)")
        midpoints = code_midpoints(code_map).clone()
        midpoints[0] = 0.0
        return cls(code_map, midpoints)


@dataclasses.dataclass(frozen=True)
class QuantizedStates:
    """One optimizer state (Adam's m, say) of a list of tensors: per tensor, flat uint8 codes
    (one per element) and float32 absmax (one per block), all indexing the same code book."""

    codes: list[torch.Tensor]
    absmax: list[torch.Tensor]
    book: CodeBook


# ---------------------------------------------------------------- PyTorch reference

# Elements per piece of the CPU path: whole blocks of one or more tensors, gathered into one flat
# buffer small enough that the ~40 elementwise passes of the update run in cache (measured on a
# shared 2-core Xeon: 64K-element pieces ran ~1.3x faster per element than 1M-element pieces).
CPU_PIECE_ELEMENTS = 1 << 16


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Consecutive segments of whole blocks, each of one tensor, updated together: segment ``k``
    is elements ``starts[k]:stops[k]`` of tensor ``tensors[k]`` and gets ``pads[k]`` zeros after
    it to fill its last block."""

    tensors: tuple[int, ...]
    starts: tuple[int, ...]
    stops: tuple[int, ...]
    whole: tuple[bool, ...]  # the segment is its entire tensor (no slicing needed)
    pads: tuple[int, ...]
    split_sizes: tuple[int, ...]  # of the gathered flat buffer: length, pad, length, pad, ...
    block_counts: tuple[int, ...]

    def views(self, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            flats[t] if whole else flats[t][start:stop]
            for t, start, stop, whole in zip(self.tensors, self.starts, self.stops, self.whole)
        ]

    def block_views(self, per_block: list[torch.Tensor], block_size: int) -> list[torch.Tensor]:
        return [
            per_block[t] if whole else per_block[t][start // block_size : n_blocks(stop, block_size)]
            for t, start, stop, whole in zip(self.tensors, self.starts, self.stops, self.whole)
        ]


@functools.lru_cache(maxsize=64)
def _pieces(numels: tuple[int, ...], block_size: int, piece_elements: int) -> tuple[_Piece, ...]:
    """Cut the tensors into segments of whole blocks and group consecutive segments into pieces
    of at most ``piece_elements`` padded elements (at least one block). Depends only on sizes."""
    piece_blocks = max(1, piece_elements // block_size)
    pieces: list[_Piece] = []
    segments: list[tuple[int, int, int]] = []
    room = piece_blocks

    def close() -> None:
        lengths = [stop - start for _, start, stop in segments]
        pads = [-length % block_size for length in lengths]
        pieces.append(
            _Piece(
                tensors=tuple(t for t, _, _ in segments),
                starts=tuple(start for _, start, _ in segments),
                stops=tuple(stop for _, _, stop in segments),
                whole=tuple(start == 0 and stop == numels[t] for t, start, stop in segments),
                pads=tuple(pads),
                split_sizes=tuple(size for pair in zip(lengths, pads) for size in pair),
                block_counts=tuple(n_blocks(length, block_size) for length in lengths),
            )
        )

    for index, numel in enumerate(numels):
        start = 0
        while start < numel:
            take = min(room, n_blocks(numel - start, block_size))
            stop = min(numel, start + take * block_size)
            segments.append((index, start, stop))
            room -= take
            start = stop
            if room == 0:
                close()
                segments, room = [], piece_blocks
    if segments:
        close()
    return tuple(pieces)


def _gather(flats: list[torch.Tensor], piece: _Piece, block_size: int, pad: torch.Tensor) -> torch.Tensor:
    """The piece's segments of ``flats`` in one [n_blocks, block] tensor of ``pad``'s dtype, each
    segment followed by its padding (taken from ``pad``, at least a block long). A piece of one
    whole-block segment is returned as a view when the dtype matches: callers only read it, except
    the 32-bit path, whose states are meant to be updated in place."""
    if len(piece.tensors) == 1 and not piece.pads[0]:
        return piece.views(flats)[0].to(pad.dtype).view(-1, block_size)
    parts = []
    for view, length in zip(piece.views(flats), piece.pads):
        parts.append(view)
        if length:
            parts.append(pad[:length])
    return torch.cat(parts).to(pad.dtype).view(-1, block_size)


def _scatter(flats: list[torch.Tensor], piece: _Piece, blocks: torch.Tensor) -> None:
    """Inverse of :func:`_gather`: copy each segment back (casting to the destination's dtype)."""
    torch._foreach_copy_(piece.views(flats), list(blocks.view(-1).split(piece.split_sizes)[::2]))


class _Scalars:
    """The update's scalars as float32 0-d tensors (the same rounding of each constant as the
    kernel's float32 arguments) plus the flags that let the reference skip exact no-ops."""

    def __init__(self, scalars: UpdateScalars):
        for field in dataclasses.fields(scalars):
            setattr(self, field.name, torch.tensor(getattr(scalars, field.name), dtype=torch.float32))
        # x + 0 * p and x * 1 change nothing but the sign of a zero.
        self.has_l2 = scalars.l2_decay != 0.0
        self.has_decay = scalars.param_decay != 1.0


def _update_fp32(kind, s: _Scalars, param, grad, state1, state2, nesterov, finite):
    """The update on fp32 tensors of one shape. ``state1``/``state2`` are overwritten with the new
    states; returns the new param. ``finite`` is the gradient's finiteness mask, or None when every
    gradient is finite (then the masking is skipped: it would change nothing)."""
    g = grad + s.l2_decay * param if s.has_l2 else grad
    decayed = param * s.param_decay if s.has_decay else param
    if kind == UpdateKind.ADAM:
        state1.mul_(s.beta1).add_(s.one_minus_beta1 * g)
        state2.mul_(s.beta2).add_(s.one_minus_beta2 * (g * g))
        denom = state2.sqrt().div_(s.bias_correction2_sqrt).add_(s.eps)
        new_param = decayed - (state1 / denom).mul_(s.step_size)
    elif kind == UpdateKind.MOMENTUM:
        state1.mul_(s.beta1).add_(s.one_minus_beta1 * g)
        direction = g + s.momentum * state1 if nesterov else state1
        new_param = param - s.lr * direction
    elif kind == UpdateKind.LION:
        direction = torch.sign(s.beta1 * state1 + s.one_minus_beta1 * g)
        new_param = decayed - s.lr * direction
        state1.mul_(s.beta2).add_(s.one_minus_beta2 * g)
    else:
        raise ValueError(f"unknown update kind {kind!r}")
    if finite is not None:
        for state in (state1, state2) if kind == UpdateKind.ADAM else (state1,):
            state.masked_fill_(~finite, 0.0)
        new_param = torch.where(finite, new_param, param)
    return new_param


def _finiteness(grad: torch.Tensor) -> torch.Tensor | None:
    # On CUDA the mask is always applied: asking whether it is all true would sync the host.
    # A finite sum proves every element finite (a sum that overflows only costs the mask).
    if not grad.is_cuda and bool(torch.isfinite(grad.sum())):
        return None
    return torch.isfinite(grad)


def _flat_views(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Flat views of the params; a non-contiguous param gets a contiguous copy, returned as a
    (param, copy) pair to write back after the update."""
    flats, write_back = [], []
    for param in params:
        param = param.detach()
        if not param.is_contiguous():
            work = param.contiguous()
            write_back.append((param, work))
            param = work
        flats.append(param.view(-1))
    return flats, write_back


def optimizer_update_32bit(
    kind: UpdateKind,
    scalars: UpdateScalars,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states1: list[torch.Tensor],
    states2: list[torch.Tensor] | None = None,
    nesterov: bool = False,
) -> None:
    """In place: the update with fp32 states shaped like each param (the 32-bit path), many
    tensors per call: the small ones are updated together in one flat buffer."""
    if not params:
        return
    s = _Scalars(scalars)
    flats, write_back = _flat_views(params)
    flat_grads = [g.reshape(-1) for g in grads]
    flat1 = [t.view(-1) for t in states1]
    flat2 = [t.view(-1) for t in states2] if kind == UpdateKind.ADAM else None
    # One "block" = 1 element: segments are whole tensors or plain slices, no padding.
    piece_elements = CPU_PIECE_ELEMENTS if not params[0].is_cuda else 1 << 62
    zero = params[0].new_zeros((), dtype=torch.float32)
    for piece in _pieces(tuple(p.numel() for p in flats), 1, piece_elements):
        p = _gather(flats, piece, 1, zero)
        s1 = _gather(flat1, piece, 1, zero)
        s2 = _gather(flat2, piece, 1, zero) if flat2 is not None else None
        g = _gather(flat_grads, piece, 1, zero)
        new_p = _update_fp32(kind, s, p, g, s1, s2, nesterov, _finiteness(g))
        _scatter(flats, piece, new_p)
        _scatter(flat1, piece, s1)
        if s2 is not None:
            _scatter(flat2, piece, s2)
    for param, work in write_back:
        param.copy_(work)


def optimizer_update_8bit_reference(
    kind: UpdateKind,
    scalars: UpdateScalars,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state1: QuantizedStates,
    state2: QuantizedStates | None = None,
    nesterov: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """In place, for every tensor of the lists: dequantize its block-wise states, update in fp32,
    requantize, write the param. Runs piece by piece (see :func:`_pieces`); blocks never mix
    tensors and every op is elementwise or per block, so the result is bit for bit that of one
    call per tensor. A ragged last block is padded with zero param, gradient and state (code of
    0, which dequantizes to exactly 0), which never changes the block's absmax."""
    _check_update_args(kind, params, grads, state1, state2, block_size)
    if not params:
        return
    s = _Scalars(scalars)
    flats, write_back = _flat_views(params)
    flat_grads = [g.reshape(-1) for g in grads]
    books = [state1.book] + ([state2.book] if kind == UpdateKind.ADAM else [])
    states = [state1, state2][: len(books)]
    zero = params[0].new_zeros(block_size, dtype=torch.float32)
    zero_codes = [torch.full((block_size,), _zero_code(book), dtype=torch.uint8, device=zero.device) for book in books]
    for piece in _pieces(tuple(p.numel() for p in flats), block_size, CPU_PIECE_ELEMENTS):
        p = _gather(flats, piece, block_size, zero)
        g = _gather(flat_grads, piece, block_size, zero)
        fp32_states = []
        for state, zero_code in zip(states, zero_codes):
            codes = _gather(state.codes, piece, block_size, zero_code)
            absmax = torch.cat(piece.block_views(state.absmax, block_size))
            fp32_states.append(dequantize_blocks_reference(codes, absmax, state.book.codes))
        state2_fp32 = fp32_states[1] if len(fp32_states) == 2 else None
        new_p = _update_fp32(kind, s, p, g, fp32_states[0], state2_fp32, nesterov, _finiteness(g))
        _scatter(flats, piece, new_p)
        for state, fp32_state in zip(states, fp32_states):
            codes, absmax = quantize_blocks_reference(fp32_state, state.book.midpoints)
            _scatter(state.codes, piece, codes)
            torch._foreach_copy_(piece.block_views(state.absmax, block_size), list(absmax.split(piece.block_counts)))
    for param, work in write_back:
        param.copy_(work)


def _zero_code(book: CodeBook) -> int:
    return int(torch.searchsorted(book.codes.cpu(), 0.0))


def _check_update_args(kind, params, grads, state1, state2, block_size) -> None:
    check_block_size(block_size)
    states = [state1] + ([state2] if N_STATES[kind] == 2 else [])
    for name, values in [("grads", grads)] + [(f"state{i}", s.codes) for i, s in enumerate(states, 1)] + [
        (f"state{i} absmax", s.absmax) for i, s in enumerate(states, 1)
    ]:
        if len(values) != len(params):
            raise ValueError(f"{len(params)} params but {len(values)} {name}; pass one per param")
    for index, (param, grad) in enumerate(zip(params, grads)):
        if grad.shape != param.shape:
            raise ValueError(f"grad shape {tuple(grad.shape)} differs from param shape {tuple(param.shape)} (tensor {index})")
        for state in states:
            codes, absmax = state.codes[index], state.absmax[index]
            if codes.dtype != torch.uint8 or codes.numel() != param.numel() or not codes.is_contiguous():
                raise ValueError("state codes must be contiguous uint8 tensors with as many elements as the param")
            if absmax.dtype != torch.float32 or absmax.numel() != n_blocks(param.numel(), block_size):
                raise ValueError(
                    f"absmax must be float32 with one entry per block of {block_size} elements "
                    f"({n_blocks(param.numel(), block_size)}), got {absmax.numel()} {absmax.dtype}"
                )


# ---------------------------------------------------------------- Triton kernel

# Launches of the update kernel since import: bench/optim_step.py reports launches per step.
launch_count = collections.Counter()

if HAS_TRITON:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

    @triton.jit
    def _dequantize(codes_ptr, absmax_ptr, map_ptr, block, offsets, in_bounds):
        code = tl.load(codes_ptr + offsets, mask=in_bounds, other=0).to(tl.int32)
        # Lanes past the end must hold 0, not code 0 (-0.99 * absmax), or they set the new absmax.
        return tl.where(in_bounds, tl.load(map_ptr + code) * tl.load(absmax_ptr + block), 0.0)

    @triton.jit
    def _requantize(state, codes_ptr, absmax_ptr, midpoints_ptr, block, offsets, in_bounds):
        # Out-of-bounds lanes hold 0 (zero gradient, zero state), so they never set the absmax.
        # It keeps NaN (max.NaN.f32): a NaN state (a NaN param under L2 decay) stores a NaN absmax,
        # as the reference does, instead of a finite one over codes that read back as -absmax.
        absmax = tl.reduce(tl.abs(state), 0, maximum_keeping_nan)
        scale = tl.where(absmax > 0, absmax, 1.0)
        # div_rn: IEEE division, as torch's (fp32 `/` compiles to the approximate div.full.f32).
        code = nearest_code(tl.div_rn(state, scale), midpoints_ptr)
        tl.store(codes_ptr + offsets, code.to(tl.uint8), mask=in_bounds)
        tl.store(absmax_ptr + block, absmax)

    @triton.jit
    def _table_pointer(row_ptr, column, dtype: tl.constexpr):
        return tl.load(row_ptr + column).to(tl.pointer_type(dtype), bitcast=True)

    @triton.jit
    def _optimizer_update_8bit_kernel(
        tensor_table_ptr, block_tensor_ptr,
        map1_ptr, midpoints1_ptr, map2_ptr, midpoints2_ptr,
        lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        l2_decay, param_decay, step_size, bias_correction2_sqrt, momentum,
        KIND: tl.constexpr, NESTEROV: tl.constexpr, BLOCK_SIZE: tl.constexpr, PARAM_DTYPE: tl.constexpr,
    ):  # fmt: skip
        # Program i updates block i of the concatenation of all tensors: block_tensor says whose;
        # the tensor's table row holds the addresses of its param, grad, codes1, absmax1, codes2,
        # absmax2, then its numel and its first block.
        program = tl.program_id(0)
        row = tensor_table_ptr + tl.load(block_tensor_ptr + program).to(tl.int64) * 8
        param_ptr = _table_pointer(row, 0, PARAM_DTYPE)
        grad_ptr = _table_pointer(row, 1, PARAM_DTYPE)
        codes1_ptr = _table_pointer(row, 2, tl.uint8)
        absmax1_ptr = _table_pointer(row, 3, tl.float32)
        codes2_ptr = _table_pointer(row, 4, tl.uint8)
        absmax2_ptr = _table_pointer(row, 5, tl.float32)
        numel = tl.load(row + 6)
        block = program - tl.load(row + 7)
        offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_bounds = offsets < numel
        param = tl.load(param_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        # NaN fails every comparison, so this is false for inf and nan alike.
        finite = tl.abs(grad) < float("inf")
        # Only under L2 decay does the param enter the gradient (the reference's rule): 0 * NaN
        # would put a NaN param's NaN into its block's states.
        if l2_decay != 0.0:
            g = grad + l2_decay * param
        else:
            g = grad
        s1 = _dequantize(codes1_ptr, absmax1_ptr, map1_ptr, block, offsets, in_bounds)
        if KIND == 0:  # Adam / AdamW
            s2 = _dequantize(codes2_ptr, absmax2_ptr, map2_ptr, block, offsets, in_bounds)
            m = beta1 * s1 + one_minus_beta1 * g
            v = beta2 * s2 + one_minus_beta2 * (g * g)
            denom = tl.sqrt_rn(v) / bias_correction2_sqrt + eps
            new_param = param * param_decay - step_size * (m / denom)
            new_s1 = m
            new_s2 = tl.where(finite, v, 0.0)
            _requantize(new_s2, codes2_ptr, absmax2_ptr, midpoints2_ptr, block, offsets, in_bounds)
        elif KIND == 1:  # momentum SGD
            buf = beta1 * s1 + one_minus_beta1 * g
            if NESTEROV:
                direction = g + momentum * buf
            else:
                direction = buf
            new_param = param - lr * direction
            new_s1 = buf
        else:  # Lion
            interpolated = beta1 * s1 + one_minus_beta1 * g
            sign = tl.where(interpolated > 0, 1.0, tl.where(interpolated < 0, -1.0, 0.0))
            new_param = param * param_decay - lr * sign
            new_s1 = beta2 * s1 + one_minus_beta2 * g
        new_s1 = tl.where(finite, new_s1, 0.0)
        _requantize(new_s1, codes1_ptr, absmax1_ptr, midpoints1_ptr, block, offsets, in_bounds)
        new_param = tl.where(finite, new_param, param)
        tl.store(param_ptr + offsets, new_param.to(PARAM_DTYPE), mask=in_bounds)


@functools.lru_cache(maxsize=64)
def _block_tensor_table(numels: tuple[int, ...], block_size: int, device: torch.device) -> torch.Tensor:
    """int32 index of the tensor that owns each block of the concatenation (depends only on sizes)."""
    counts = torch.tensor([n_blocks(n, block_size) for n in numels])
    return torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts).to(device)


# The launches' pointer tables, on their device, keyed by their whole content (every address,
# numel and first block): a step whose tensors have not moved reuses its table -- no
# host-to-device copy, nothing for the host to wait on, and the same buffer for a CUDA graph to
# replay. A table can never be stale: a new address or size is a new key. One entry per
# (param group, device, dtype) in use; the least recently used goes past the bound.
POINTER_TABLE_CACHE_SIZE = 64
_pointer_tables: collections.OrderedDict = collections.OrderedDict()


def _build_pointer_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        # From pinned memory the copy is asynchronous; from pageable memory the host would wait.
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def _pointer_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    key = (device, rows)
    table = _pointer_tables.get(key)
    if table is None:
        table = _pointer_tables[key] = _build_pointer_table(rows, device)
        if len(_pointer_tables) > POINTER_TABLE_CACHE_SIZE:
            _pointer_tables.popitem(last=False)
    else:
        _pointer_tables.move_to_end(key)
    return table


def num_warps_for(block_size: int, kind: UpdateKind = UpdateKind.ADAM) -> int:
    """Adam's two states over 4096-element blocks take 16 warps (with 8, 16-bit params spilled on
    sm_80 in the compile gate, while the one-state kinds spill on sm_80 with 16)."""
    return blockwise_num_warps(block_size, cap=16 if kind == UpdateKind.ADAM else 8)


def launch_tiles(block_size: int, kind: UpdateKind) -> list:
    """The configs the update kernel may launch with, in order of preference (the first:
    :func:`num_warps_for`); the compile gate checks each where the launch would take it."""
    return elementwise_tiles(f"optimizer_update_{kind.name.lower()}", block_size, cap=16 if kind == UpdateKind.ADAM else 8)


def launch_tile(block_size: int, kind: UpdateKind, device: torch.device):
    """The config of the update kernel on ``device`` (blockwise.elementwise_tile's rule)."""
    return elementwise_tile(f"optimizer_update_{kind.name.lower()}", block_size, device, cap=16 if kind == UpdateKind.ADAM else 8)


def optimizer_update_8bit_triton(
    kind: UpdateKind,
    scalars: UpdateScalars,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state1: QuantizedStates,
    state2: QuantizedStates | None = None,
    nesterov: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """In place, same contract as :func:`optimizer_update_8bit_reference`: one kernel launch per
    device and param dtype in the list, under that device (a non-contiguous param or grad costs a
    copy, and one back, and a new pointer table each step: the copy's address changes)."""
    require_triton()
    _check_update_args(kind, params, grads, state1, state2, block_size)
    if kind != UpdateKind.ADAM:  # one-state optimizers: the second pointers are never read
        state2 = state1
    flats, write_back = _flat_views(params)
    grads = [g.contiguous() for g in grads]
    # One launch per (device, dtype): a kernel reads the tensors of one GPU, and runs on it.
    launches: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, flat in enumerate(flats):
        if flat.numel():
            launches.setdefault((flat.device, flat.dtype), []).append(index)
    for (device, dtype), indices in launches.items():
        numels = tuple(flats[i].numel() for i in indices)
        block_tensor = _block_tensor_table(numels, block_size, device)
        rows, first_block = [], 0
        for i, numel in zip(indices, numels):
            rows.append((
                flats[i].data_ptr(), grads[i].data_ptr(),
                state1.codes[i].data_ptr(), state1.absmax[i].data_ptr(),
                state2.codes[i].data_ptr(), state2.absmax[i].data_ptr(),
                numel, first_block,
            ))  # fmt: skip
            first_block += n_blocks(numel, block_size)
        table = _pointer_table(tuple(rows), device)
        with launch_device(flats[indices[0]]):
            _optimizer_update_8bit_kernel[(first_block,)](
                table, block_tensor,
                state1.book.codes, state1.book.midpoints, state2.book.codes, state2.book.midpoints,
                *(getattr(scalars, f.name) for f in dataclasses.fields(scalars)),
                KIND=int(kind), NESTEROV=bool(nesterov), BLOCK_SIZE=block_size, PARAM_DTYPE=_TL_DTYPES[dtype],
                num_warps=launch_tile(block_size, kind, device).num_warps,
            )  # fmt: skip
        launch_count["optimizer_update_8bit"] += 1
    for param, work in write_back:
        param.copy_(work)


def optimizer_update_8bit(
    kind: UpdateKind,
    scalars: UpdateScalars,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    state1: QuantizedStates,
    state2: QuantizedStates | None = None,
    nesterov: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> None:
    """The 8-bit update of a list of params in place: Triton on CUDA tensors, the reference on
    CPU tensors (``torch.ops.bytetune.optimizer_update_8bit``, which takes the dataclasses flat)."""
    if not params:
        return
    second = (state2.codes, state2.absmax, state2.book.codes, state2.book.midpoints) if state2 else ([], [], None, None)
    _ops.optimizer_update_8bit(
        int(kind), [getattr(scalars, f.name) for f in dataclasses.fields(scalars)], params, grads,
        state1.codes, state1.absmax, state1.book.codes, state1.book.midpoints, *second, bool(nesterov), block_size,
    )  # fmt: skip
