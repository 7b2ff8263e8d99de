"""The helpers every kernel module shares.

Every op in ``bytetune.kernels`` exists twice: a Triton kernel (the GPU path) and a plain-PyTorch
reference of the same math (the CPU path and the oracle in tests). Which one runs is the
dispatcher's choice: each op is declared once (:mod:`bytetune.kernels._ops`) and its kernel
registered per device (:mod:`bytetune.kernels.backends`).

``BYTETUNE_FORCE_TRITON=1`` (with ``TRITON_INTERPRET=1`` set before triton is imported) sends CPU
tensors through the Triton kernels too, so the layer and optimizer suites can exercise the GPU
path on a machine without a GPU (the CPU backend reads :func:`force_triton` at every call).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def abs_bits(x):
        """The int32 bits of |x| (x float32): for non-negative floats the integer order of the bits
        is the float order, and every NaN lies above +inf. So an integer max of them is an absmax
        that keeps NaN, as torch's amax does; ``tl.max`` / ``tl.maximum`` on floats compile to
        ``max.f32``, which returns the non-NaN operand and would hide a NaN behind a finite
        scale. The sign bit is cleared by a mask, not ``abs.f32`` (whose NaN sign PTX leaves
        open). Turn a result back into a float with :func:`float_from_bits`."""
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF

    @triton.jit
    def float_from_bits(bits):
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def maximum_keeping_nan(a, b):
        """A ``tl.reduce`` combine: PTX ``max.NaN.f32``. Where registers are tight (the optimizer
        kernel) it costs less than :func:`abs_bits`' integer reduction; the interpreter runs a
        custom combine element by element, so the other kernels use abs_bits."""
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


def force_triton() -> bool:
    """Whether ``BYTETUNE_FORCE_TRITON`` asks for the Triton kernels on every device (read per call)."""
    return os.environ.get("BYTETUNE_FORCE_TRITON", "") not in ("", "0")


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: call the *_reference function or install triton")


def launch_device(*tensors: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context for a Triton launch on these tensors: ``torch.cuda.device(<their GPU>)``.

    Triton launches on ``torch.cuda.current_device()``, not on its arguments' device
    (triton-lang/triton #2925, #5205): a model spread over GPUs by ``device_map="auto"`` would
    run its layers on cuda:1 with GPU 0 current. Every launcher wraps its launch in this. It costs
    one comparison when the tensors' GPU is already current (the usual single-GPU case), and
    nothing for CPU tensors (the interpreter). The first CUDA tensor decides; the launchers pass
    their main input, and every other tensor of a launch is on the same device.
    """
    for tensor in tensors:
        if tensor is not None and tensor.is_cuda:
            index = tensor.device.index
            if index is None or index == torch.cuda.current_device():
                return contextlib.nullcontext()
            return torch.cuda.device(index)
    return contextlib.nullcontext()


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (the rounding of the group-wise codes)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)
