"""Adapters both backends wrap their kernels in."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from bytetune.kernels.optim_update import CodeBook, QuantizedStates, UpdateKind, UpdateScalars


def late(module, name: str) -> Callable:
    """``module.<name>``, looked up at each call: the tests (and a profiler) replace a kernel
    module's launcher or reference by assignment, and the registered kernel must follow."""

    def run(*args):
        return getattr(module, name)(*args)

    run.__name__ = run.__qualname__ = name
    return run


def autocast_off(body: Callable) -> Callable:
    """Run a layer op's kernel with autocast off. The layers cast their input to the autocast
    dtype themselves; inside, the references' float32 partial products (and the int8 reference's
    float64 GEMM) must keep their precision, and autocast would recast those matmuls to 16 bits.
    (The dispatcher's autocast keys fall through for these ops, so the state is still on here.)"""

    @functools.wraps(body)
    def run(*args):
        device_type = args[0].device.type
        if not torch.is_autocast_enabled(device_type):
            return body(*args)  # entering the context costs more than this check
        with torch.autocast(device_type, enabled=False):
            return body(*args)

    return run


def optimizer_update_from_schema(body: Callable) -> Callable:
    """The ``bytetune::optimizer_update_8bit`` kernel around ``body(kind, scalars, params, grads,
    state1, state2, nesterov, block_size)``: rebuilds the dataclasses the schema flattens."""

    def run(kind, scalars, params, grads, codes1, absmax1, book1_codes, book1_midpoints,
            codes2, absmax2, book2_codes, book2_midpoints, nesterov, block_size):  # fmt: skip
        state1 = QuantizedStates(codes1, absmax1, CodeBook(book1_codes, book1_midpoints))
        state2 = None
        if book2_codes is not None:
            state2 = QuantizedStates(codes2, absmax2, CodeBook(book2_codes, book2_midpoints))
        body(UpdateKind(kind), UpdateScalars(*scalars), params, grads, state1, state2, nesterov, block_size)

    return run
