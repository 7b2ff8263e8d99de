"""The one rule that picks an op's implementation.

Every op in ``bytetune.kernels`` exists twice: a Triton kernel (the GPU path) and a plain-PyTorch
reference of the same math (the CPU path and the oracle in tests). Public ops call
:func:`use_triton` on their main input and nothing else decides.

Tests run the Triton kernels on CPU tensors by calling the ``*_triton`` functions directly with
``TRITON_INTERPRET=1`` set before triton is imported.
"""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """CUDA tensors go to the Triton kernel; everything else to the PyTorch reference."""
    return HAS_TRITON and tensor.is_cuda
