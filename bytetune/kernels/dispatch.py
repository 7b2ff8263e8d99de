"""The one rule that picks an op's implementation, and the helpers every kernel module shares.

Every op in ``bytetune.kernels`` exists twice: a Triton kernel (the GPU path) and a plain-PyTorch
reference of the same math (the CPU path and the oracle in tests). Public ops call
:func:`use_triton` on their main input and nothing else decides.

``BYTETUNE_FORCE_TRITON=1`` (with ``TRITON_INTERPRET=1`` set before triton is imported) sends CPU
tensors through the Triton kernels too, so the layer and optimizer suites can exercise the GPU
path on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def force_triton() -> bool:
    """Whether ``BYTETUNE_FORCE_TRITON`` asks for the Triton kernels on every device (read per call)."""
    return os.environ.get("BYTETUNE_FORCE_TRITON", "") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """CUDA tensors go to the Triton kernel; everything else to the PyTorch reference."""
    return HAS_TRITON and (tensor.is_cuda or force_triton())


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: call the *_reference function or install triton")


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (the rounding of the group-wise codes)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)
