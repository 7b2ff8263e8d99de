"""What each device's backend registered for the ``bytetune::`` ops (:mod:`bytetune.kernels._ops`).

``IMPLEMENTATIONS[(op name, device type)]`` is the Python function the dispatcher runs for that
op on that device: what a dispatch mode in the tests steps into, since a mode does not see the
ops inside a registered kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bytetune.kernels._ops import LIBRARY

IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}
# device type -> whether its backend runs the Triton launchers now (see runs_triton)
_TRITON_ROUTE: dict[str, Callable[[], bool]] = {}

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def register(op: str, device_type: str, fn: Callable) -> None:
    """``fn`` becomes the ``device_type`` kernel of ``bytetune::<op>``."""
    LIBRARY.impl(op, fn, _DISPATCH_KEYS[device_type])
    IMPLEMENTATIONS[(f"bytetune::{op}", device_type)] = fn


def register_triton_route(device_type: str, decides: Callable[[], bool]) -> None:
    _TRITON_ROUTE[device_type] = decides


def runs_triton(device: torch.device) -> bool:
    """Whether the ops registered for ``device`` run their Triton launchers (the sync-free GPU
    route) rather than the PyTorch references. The backend of that device decides; composite
    code that must shape its data for the route taken (the fused cross-entropy's targets) asks
    here instead of deciding again. A device with no backend (meta) takes neither."""
    decides = _TRITON_ROUTE.get(device.type)
    return decides is not None and decides()


def implementation(op: str, device_type: str) -> Callable:
    """The function registered for ``op`` (``"bytetune::int8_linear"``) on ``device_type``."""
    return IMPLEMENTATIONS[(op, device_type)]
