"""Exact int8 x int8 -> int32 products on the CPU, and the run-time choice of how to compute them.

Three ways, all exact, so they return the same int32 bits and the choice changes speed only:

- ``"int_mm"``: ``torch._int_mm`` (oneDNN's s8 x s8 -> s32 GEMM). Where the CPU has int8 dot
  products (AVX-512 VNNI, AVX-VNNI, AMX) it is several times faster than an fp32 GEMM; on CPUs
  without them it can be slower.
- ``"fp32"``: an fp32 GEMM of the codes with K cut into chunks of at most ``FP32_EXACT_K``
  columns. A chunk's products and partial sums are integers of magnitude at most
  ``FP32_EXACT_K * 127**2 < 2**24``, all exactly representable in fp32, so every addition is
  exact in any order (FMA included); the chunks are then summed in int32. This needs fp32
  matmuls at full precision: ``torch.set_float32_matmul_precision("highest")``, the default.
- :func:`int32_matmul_nt_exact`: a float64 product, exact for any K below 2**37 / 127**2; slow.
  The oracle the tests compare the other two against.

:func:`cpu_int8_gemm_choice` picks between the first two once per process with a probe (the
``_int_mm`` result checked against the oracle, then both timed at one small shape), because
which one is faster depends on the CPU's instruction set, not on anything known ahead.
``BYTETUNE_CPU_INT8_GEMM=int_mm`` or ``=fp32`` overrides the probe (read on every call).
"""

from __future__ import annotations

import functools
import os
import time

import torch

# 1040 * 127**2 = 16,774,160 < 2**24 = 16,777,216: the widest K an fp32 product holds exactly.
FP32_EXACT_K = 1040
CPU_INT8_GEMMS = ("int_mm", "fp32")
GEMM_ENV_VAR = "BYTETUNE_CPU_INT8_GEMM"
# The probe's shape: a few milliseconds of work, K > FP32_EXACT_K so that the fp32 way is timed
# with its chunking, codes at +-127 so that an int32 product that saturated or wrapped fails.
_PROBE_M, _PROBE_K, _PROBE_N = 128, 1536, 256
_PROBE_REPEATS = 5

__all__ = [
    "FP32_EXACT_K",
    "cpu_int8_gemm_choice",
    "cpu_int8_gemm_probe_info",
    "int32_matmul_nt",
    "int32_matmul_nt_exact",
    "int32_matmul_nt_fp32",
    "int32_matmul_nt_int_mm",
    "int_mm_problem",
]


def int32_matmul_nt_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K].T int8 -> int32 [M, N] through float64: the test oracle."""
    return (a.double() @ b.double().t()).to(torch.int32)


def int32_matmul_nt_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K].T int8 -> int32 [M, N] with ``torch._int_mm``.

    ``b.t()`` is a strided view ([K, N] column-major): oneDNN reads it in place, so the weight,
    kept in nn.Linear's [N, K] layout, is never copied or cached transposed.
    """
    if a.shape[0] == 0 or a.shape[1] == 0 or b.shape[0] == 0:
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    return torch._int_mm(a, b.t())


def int32_matmul_nt_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K].T int8 -> int32 [M, N] with fp32 GEMMs over K-chunks of <= 1040."""
    k = a.shape[1]
    if k <= FP32_EXACT_K:
        return (a.float() @ b.float().t()).to(torch.int32)
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for start in range(0, k, FP32_EXACT_K):
        stop = min(start + FP32_EXACT_K, k)
        acc += (a[:, start:stop].float() @ b[:, start:stop].float().t()).to(torch.int32)
    return acc


def _best_ms(fn, a: torch.Tensor, b: torch.Tensor) -> float:
    best = float("inf")
    for _ in range(_PROBE_REPEATS):
        start = time.perf_counter()
        fn(a, b)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[str, dict]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (_PROBE_M, _PROBE_K), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (_PROBE_N, _PROBE_K), generator=gen, dtype=torch.int8)
    a[0], b[0], b[1] = 127, 127, -127  # sums of +-K * 127**2, beyond fp32's exact range
    info = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    exact = int32_matmul_nt_exact(a, b)
    try:
        int_mm_ok = torch.equal(int32_matmul_nt_int_mm(a, b), exact)
    except RuntimeError as err:  # a build without the CPU kernel
        info["int_mm_error"] = str(err)
        return "fp32", info
    if not int_mm_ok:
        info["int_mm_error"] = "result differs from the exact product"
        return "fp32", info
    # Alternate the two so that a burst of load from other processes hits both; keep the best.
    int_mm_ms = fp32_ms = float("inf")
    for _ in range(2):
        int_mm_ms = min(int_mm_ms, _best_ms(int32_matmul_nt_int_mm, a, b))
        fp32_ms = min(fp32_ms, _best_ms(int32_matmul_nt_fp32, a, b))
    info.update(probe_shape=(_PROBE_M, _PROBE_K, _PROBE_N), int_mm_ms=int_mm_ms, fp32_ms=fp32_ms)
    return ("int_mm" if int_mm_ms <= fp32_ms else "fp32"), info


def cpu_int8_gemm_choice() -> str:
    """``"int_mm"`` or ``"fp32"``: the environment override, else the probe's pick (probed once)."""
    forced = os.environ.get(GEMM_ENV_VAR, "")
    if forced:
        if forced not in CPU_INT8_GEMMS:
            raise ValueError(f"{GEMM_ENV_VAR}={forced!r}: use one of {CPU_INT8_GEMMS}, or unset it to probe")
        if forced == "int_mm":
            # Forcing must not make a wrong product: oneDNN's s8 GEMM is not exact on every CPU
            # (held to AVX2, torch 2.13's returns garbage at +-127 codes), which the probe checks.
            problem = int_mm_problem()
            if problem:
                raise ValueError(
                    f"{GEMM_ENV_VAR}=int_mm, but torch._int_mm cannot be used on this CPU "
                    f"({torch.backends.cpu.get_cpu_capability()}): {problem}; unset {GEMM_ENV_VAR} or set it to fp32"
                )
        return forced
    return _probe()[0]


def int_mm_problem() -> str | None:
    """Why ``torch._int_mm`` cannot compute this CPU's exact products (it is missing, or its result
    differs from the exact one at the probe's extreme codes), or None where it can (probed once)."""
    return _probe()[1].get("int_mm_error")


def cpu_int8_gemm_probe_info() -> dict:
    """What the probe saw: the CPU capability torch reports and the two timings (for benches)."""
    return dict(_probe()[1], choice=_probe()[0])


def int32_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K].T int8 -> exact int32 [M, N], on the CPU the faster way here.

    Tensors on another device (GPU test runs compare the Triton kernels with the references
    there) get the float64 product.
    """
    if a.device.type != "cpu":
        return int32_matmul_nt_exact(a, b)
    if cpu_int8_gemm_choice() == "int_mm":
        return int32_matmul_nt_int_mm(a, b)
    return int32_matmul_nt_fp32(a, b)
