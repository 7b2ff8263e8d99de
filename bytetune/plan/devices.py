"""Devices a plan is made for, and what each needs beyond the tensors counted (runtime, allocator
slack)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

GiB = 1024**3
MiB = 1024**2

# Runtime memory that no tensor count sees. The figures are stated here and printed with every plan.
# CUDA: the context, cuBLAS workspaces and loaded kernels take 0.5-0.8 GiB per device on recent
# GPUs. The caching allocator rounds and fragments: little for tensors allocated once (weights,
# LoRA, optimizer states), more for the activations and temporaries freed and reallocated each step.
CUDA_CONTEXT_BYTES = 768 * MiB
CUDA_SLACK_STATIC = 0.02
CUDA_SLACK_DYNAMIC = 0.20
# CPU: the Python process with torch + transformers imported (about 0.7 GiB RSS here), and glibc's
# allocator keeping freed chunks mapped.
CPU_RUNTIME_BYTES = 1 * GiB
CPU_SLACK_STATIC = 0.02
CPU_SLACK_DYNAMIC = 0.20


@dataclass
class Device:
    name: str  # "cuda:0" or "cpu"
    capacity: int  # bytes

    @property
    def kind(self) -> str:
        return self.name.split(":")[0]

    @property
    def accelerate_key(self):
        return int(self.name.split(":")[1]) if self.kind == "cuda" else "cpu"


_UNITS = {"gib": GiB, "gb": 10**9, "mib": MiB, "mb": 10**6, "tib": 1024**4, "tb": 10**12, "b": 1}


def parse_size(text: str) -> int:
    """Bytes of a size with its unit (24GiB, 80GB, 512MiB); a device of no memory is an error, not
    a device on which nothing fits."""
    low = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if low.endswith(unit):
            number = low[: -len(unit)].strip()
            try:
                value = float(number)
            except ValueError:
                raise ValueError(f"size {text!r}: {number!r} is not a number; write e.g. 24GiB, 80GB, 512MiB") from None
            if not (math.isfinite(value) and value * _UNITS[unit] >= 1):
                raise ValueError(f"size {text!r}: a device needs a finite memory size > 0, e.g. 24GiB")
            return int(value * _UNITS[unit])
    raise ValueError(f"size {text!r} has no unit: write e.g. 24GiB, 80GB, 512MiB")


def parse_devices(spec: str | Sequence[Device]) -> list[Device]:
    """'8x24GiB' -> eight CUDA devices; 'cpu:24GiB' -> the CPU; '2x24GiB,1x48GiB' mixes sizes."""
    if not isinstance(spec, str):
        return list(spec)
    devices: list[Device] = []
    for part in spec.split(","):
        part = part.strip()
        if part.lower().startswith("cpu"):
            _, _, size = part.partition(":")
            if not size:
                raise ValueError(f"{part!r}: give the CPU's memory, e.g. cpu:24GiB")
            devices.append(Device("cpu", parse_size(size)))
            continue
        count, sep, size = part.lower().partition("x")
        if not sep or not count.isdigit():
            raise ValueError(f"device spec {part!r}: write COUNTxSIZE, e.g. 8x24GiB (or cpu:24GiB)")
        if int(count) == 0:
            raise ValueError(f"device spec {part!r}: the count must be at least 1, e.g. 1x24GiB")
        try:
            capacity = parse_size(part[len(count) + 1:])
        except ValueError as error:
            raise ValueError(f"device spec {part!r}: {error}") from None
        start = sum(d.kind == "cuda" for d in devices)
        devices += [Device(f"cuda:{start + i}", capacity) for i in range(int(count))]
    return devices


def check_usable(devices: list[Device], spec: str) -> list[Device]:
    """Devices larger than their runtime's own memory: a plan on less places nothing and reads as
    "fits" per device (1x1B is a typo for 1x1GB, not a device). The planner's command line asks
    this of what a user typed."""
    for device in devices:
        floor = CUDA_CONTEXT_BYTES if device.kind == "cuda" else CPU_RUNTIME_BYTES
        if device.capacity <= floor:
            raise ValueError(f"device spec {spec!r}: {device.name} has {device.capacity / GiB:.3g} GiB, no more than the runtime alone "
                             f"takes ({floor / GiB:.2f} GiB): give the device's memory, e.g. 24GiB")
    return devices


def runtime_overhead(device: Device, static: int, dynamic: int) -> int:
    """Bytes a device needs beyond the tensors counted: runtime + allocator slack."""
    if device.kind == "cuda":
        return CUDA_CONTEXT_BYTES + int(CUDA_SLACK_STATIC * static + CUDA_SLACK_DYNAMIC * dynamic)
    return CPU_RUNTIME_BYTES + int(CPU_SLACK_STATIC * static + CPU_SLACK_DYNAMIC * dynamic)


def overhead_figures() -> str:
    return (
        f"runtime overhead per device: CUDA {CUDA_CONTEXT_BYTES / MiB:.0f} MiB (context, cuBLAS, kernels); "
        f"CPU {CPU_RUNTIME_BYTES / MiB:.0f} MiB (process with torch); plus allocator slack of "
        f"{CUDA_SLACK_STATIC:.0%} of static and {CUDA_SLACK_DYNAMIC:.0%} of activations + temporaries"
    )
