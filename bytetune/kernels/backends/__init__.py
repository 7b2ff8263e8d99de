"""Per-device implementations of the ``bytetune::`` ops: importing this registers them.

- :mod:`~bytetune.kernels.backends.cuda`: the Triton launchers.
- :mod:`~bytetune.kernels.backends.cpu`: the PyTorch references, or the Triton launchers (in the
  interpreter) under ``BYTETUNE_FORCE_TRITON=1``; the one place that reads that switch to pick.
"""

from bytetune.kernels.backends import cpu, cuda  # noqa: F401  (registers the kernels)
from bytetune.kernels.backends.registry import IMPLEMENTATIONS, implementation, runs_triton

__all__ = ["IMPLEMENTATIONS", "implementation", "runs_triton"]
