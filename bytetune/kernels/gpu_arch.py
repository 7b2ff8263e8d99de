"""Per-GPU-generation limits and the rule that decides which tile configs may launch on a device.

One definition, used twice: the kernels prune their autotune menus and fixed tiles with
:func:`launchable` at launch (fed from ``torch.cuda.get_device_properties``), and the compile gate
(``bench/gpu_compile.py``) compiles every config for every generation in :data:`ARCHS` and fails
when a config this rule lets launch does not compile, needs more shared memory than the
generation has, or spills registers.

Shared memory cannot be known before compiling, so a config carries an estimate (the kernel's
``shared_bytes`` function); the gate prints the estimate beside the compiled figure, so an
estimate that runs low shows up as a failed row, never as a crash on a card.

Registers depend on the compiler too: the same config can spill under one Triton release and
not under the next. A config records where the gate saw it spill (``Tile.spills_on``, keyed by
``triton.__version__``'s major.minor), and :func:`launchable` keeps it off there, at launch
and in the gate alike (docs/triton_versions.md).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Arch:
    capability: int  # major * 10 + minor, e.g. 86
    max_shared_bytes: int  # opt-in maximum of shared memory per block
    gpus: str


# Opt-in shared memory per block, from the CUDA programming guide's compute-capability table.
ARCHS = {
    75: Arch(75, 64 * 1024, "T4, RTX 20xx"),
    80: Arch(80, 163 * 1024, "A100, A800"),
    86: Arch(86, 99 * 1024, "RTX 30xx, A10, A40, A6000"),
    89: Arch(89, 99 * 1024, "RTX 40xx, L4, L40"),
    90: Arch(90, 227 * 1024, "H100, H200, GH200"),
}

# The oldest generation on which the tl.dot (GEMM) kernels may launch. Triton 3.9 lowers tl.dot
# to tensor cores from sm_80 on; on sm_75 the compile gate shows int8 dots failing to compile and
# fp16/bf16 dots compiling to FMA loops that spill, so there the GEMMs run their PyTorch
# references (one warning per process).
DOT_MIN_CAPABILITY = 80


@dataclasses.dataclass(frozen=True)
class Tile:
    """One launch config: constexpr tile sizes plus warps and pipeline stages.

    ``min_capability`` keeps a config off older generations where it spills (the gate shows
    which). ``spills_on`` lists ``("major.minor" triton version, capability)`` pairs where the
    gate saw it spill under that Triton release (capability 0: every generation)."""

    block: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 3
    min_capability: int = 0
    spills_on: tuple[tuple[str, int], ...] = ()

    @property
    def kwargs(self) -> dict[str, int]:
        return dict(self.block)

    def __getitem__(self, name: str) -> int:
        return self.kwargs[name]

    def key(self) -> tuple:
        return (tuple(sorted(self.block)), self.num_warps, self.num_stages)

    def label(self) -> str:
        sizes = "x".join(str(v) for k, v in self.block if k.startswith("BLOCK"))
        extra = " ".join(f"{k}={v}" for k, v in self.block if not k.startswith("BLOCK"))
        return " ".join(part for part in (sizes, f"w{self.num_warps} s{self.num_stages}", extra) if part)


def tile(
    num_warps: int = 4, num_stages: int = 3, min_capability: int = 0,
    spills_on: tuple[tuple[str, int], ...] = (), **block: int,
) -> Tile:  # fmt: skip
    return Tile(tuple(block.items()), num_warps, num_stages, min_capability, tuple(spills_on))


@functools.lru_cache(maxsize=None)
def triton_version() -> str:
    """``"major.minor"`` of the installed triton (``""`` without one): the key of ``Tile.spills_on``."""
    try:
        import triton
    except ImportError:
        return ""
    return ".".join(triton.__version__.split(".")[:2])


def config_key(config) -> tuple:
    """The :meth:`Tile.key` of a ``triton.Config``."""
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def triton_configs(tiles: list[Tile]) -> list:
    import triton

    return [triton.Config(t.kwargs, num_warps=t.num_warps, num_stages=t.num_stages) for t in tiles]


def launchable(
    config: Tile,
    capability: int,
    max_shared_bytes: int,
    shared_bytes: Callable[[Tile], int],
    version: str | None = None,
) -> str | None:
    """None when ``config`` may launch on this device under triton ``version`` (default: the
    installed one), else the reason it may not."""
    if capability < config.min_capability:
        return f"needs sm_{config.min_capability}+"
    version = triton_version() if version is None else version
    if any(v == version and cap in (0, capability) for v, cap in config.spills_on):
        return f"spills under triton {version}"
    needed = shared_bytes(config)
    if needed > max_shared_bytes:
        return f"shared {needed} > {max_shared_bytes}"
    return None


def prune(
    configs: list[Tile], capability: int, max_shared_bytes: int, shared_bytes: Callable[[Tile], int]
) -> list[Tile]:
    return [c for c in configs if launchable(c, capability, max_shared_bytes, shared_bytes) is None]


def first_launchable(
    candidates: list[Tile], capability: int, max_shared_bytes: int, shared_bytes: Callable[[Tile], int] = lambda t: 0
) -> Tile:
    """The first of ``candidates`` (in order of preference) that may launch on this device: how a
    kernel with one fixed config per shape falls back where its first choice spills."""
    for config in candidates:
        if launchable(config, capability, max_shared_bytes, shared_bytes) is None:
            return config
    raise RuntimeError(
        f"no launch config fits sm_{capability} under triton {triton_version()}: "
        + ", ".join(c.label() for c in candidates)
    )


def autotune_enabled() -> bool:
    """``BYTETUNE_AUTOTUNE=0`` launches one fixed tile per kernel on a GPU: the GPU test run sets
    it so that dozens of small test shapes do not each pay a tuning sweep."""
    return os.environ.get("BYTETUNE_AUTOTUNE", "1") != "0"


def m_bucket(m: int) -> int:
    """Autotuning key for a token count: its next power of two (capped), so every batch size of
    a run does not trigger a fresh sweep."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)


@functools.lru_cache(maxsize=None)
def _cuda_arch(device_index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device_index)
    capability = props.major * 10 + props.minor
    known = ARCHS.get(capability)
    fallback = known.max_shared_bytes if known else props.shared_memory_per_block
    return capability, int(getattr(props, "shared_memory_per_block_optin", fallback))


def device_arch(device: torch.device) -> tuple[int, int] | None:
    """(capability, max shared bytes per block) of a CUDA device; None elsewhere (the Triton
    interpreter runs any config)."""
    if device.type != "cuda":
        return None
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _dot_runs_on(capability: int) -> bool:
    # Decided once per process and generation, with one warning.
    if capability >= DOT_MIN_CAPABILITY:
        return True
    warnings.warn(
        f"sm_{capability} GPU: bytetune's Triton GEMMs need sm_{DOT_MIN_CAPABILITY}+ (Triton has no int8 "
        "tl.dot below it and its 16-bit dots spill); the GEMMs run their PyTorch references instead",
        stacklevel=4,
    )
    return False


def dot_supported(device: torch.device) -> bool:
    """Whether the tl.dot kernels may launch on ``device`` (always, in the interpreter); False
    means the op runs its PyTorch reference."""
    arch = device_arch(device)
    return arch is None or _dot_runs_on(arch[0])
