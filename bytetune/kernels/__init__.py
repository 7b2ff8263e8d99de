"""Triton kernels, each beside its plain-PyTorch reference. Imports nothing else of bytetune."""

from bytetune.kernels.dispatch import HAS_TRITON, use_triton

__all__ = ["HAS_TRITON", "use_triton"]
