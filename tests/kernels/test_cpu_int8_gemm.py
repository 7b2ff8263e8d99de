"""The CPU's exact int8 x int8 -> int32 products: torch._int_mm and fp32 K-chunks against the
float64 oracle, the oracle against int64 math, and the run-time choice between them."""

import importlib

import pytest
import torch

from bytetune.kernels.cpu_int8_gemm import (
    FP32_EXACT_K,
    cpu_int8_gemm_choice,
    cpu_int8_gemm_probe_info,
    int32_matmul_nt,
    int32_matmul_nt_exact,
    int32_matmul_nt_fp32,
    int32_matmul_nt_int_mm,
)

GEMM_MODULE = importlib.import_module("bytetune.kernels.cpu_int8_gemm")
FAST_WAYS = {"int_mm": int32_matmul_nt_int_mm, "fp32": int32_matmul_nt_fp32}
SHAPES = [  # (M, K, N): single rows/columns, odd sizes, K on both sides of fp32's exact range
    (1, 1, 1),
    (1, 255, 257),
    (257, 255, 1),
    (3, FP32_EXACT_K, 17),
    (5, FP32_EXACT_K + 1, 3),
    (17, 4097, 33),
]


def _codes(rows, cols, seed):
    codes = torch.randint(-127, 128, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    codes[0] = 127  # extreme codes: the largest sums, beyond 2**24 once K > 1040
    if rows > 2:
        codes[2] = -127
    return codes


def _int64_product(a, b):
    return a.long() @ b.long().t()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_oracle_is_the_int64_product(shape):
    m, k, n = shape
    a, b = _codes(m, k, 0), _codes(n, k, 1)
    assert torch.equal(int32_matmul_nt_exact(a, b).long(), _int64_product(a, b))


@pytest.mark.parametrize("way", list(FAST_WAYS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fast_ways_equal_the_oracle(way, shape):
    m, k, n = shape
    a, b = _codes(m, k, 2), _codes(n, k, 3)
    out = FAST_WAYS[way](a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, int32_matmul_nt_exact(a, b))


def test_extreme_sums_are_exact():
    # Every code +-127 with K = 4097: |sum| = 4097 * 127**2 = 66,080,513, odd, above 2**24.
    a = torch.full((2, 4097), 127, dtype=torch.int8)
    b = torch.full((3, 4097), -127, dtype=torch.int8)
    b[1, 7] = 126
    expected = _int64_product(a, b)
    assert expected[0, 0] == -4097 * 127**2
    for name, way in FAST_WAYS.items():
        if name == "int_mm" and GEMM_MODULE.int_mm_problem():
            continue  # refused on this CPU (test_forcing_int_mm_where_it_is_wrong_is_an_error)
        assert torch.equal(way(a, b).long(), expected)


@pytest.mark.parametrize("way", list(FAST_WAYS))
def test_strided_views_as_the_group_wise_gemm_passes_them(way):
    # Column slices of [M, K] / [N, K] codes: non-contiguous, as one K-group of a weight.
    a, b = _codes(19, 300, 4), _codes(23, 300, 5)
    cols = slice(64, 192)
    assert torch.equal(FAST_WAYS[way](a[:, cols], b[:, cols]), int32_matmul_nt_exact(a[:, cols], b[:, cols]))


@pytest.mark.parametrize("way", list(FAST_WAYS))
@pytest.mark.parametrize("shape", [(0, 8, 3), (4, 0, 3), (4, 8, 0)], ids=str)
def test_empty_dimensions(way, shape):
    m, k, n = shape
    out = FAST_WAYS[way](torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8))
    assert out.shape == (m, n) and out.dtype == torch.int32 and not out.any()


def test_probe_picks_an_exact_way_and_reports_what_it_saw(monkeypatch):
    monkeypatch.delenv("BYTETUNE_CPU_INT8_GEMM", raising=False)
    info = cpu_int8_gemm_probe_info()
    assert cpu_int8_gemm_choice() == info["choice"] in FAST_WAYS
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if "int_mm_error" not in info:
        assert info["int_mm_ms"] > 0 and info["fp32_ms"] > 0


def test_probe_falls_back_to_fp32_when_int_mm_is_wrong_or_missing(monkeypatch):
    monkeypatch.delenv("BYTETUNE_CPU_INT8_GEMM", raising=False)
    GEMM_MODULE._probe.cache_clear()
    try:
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32))
        assert cpu_int8_gemm_choice() == "fp32"
        assert "differs" in cpu_int8_gemm_probe_info()["int_mm_error"]
        GEMM_MODULE._probe.cache_clear()

        def missing(a, b):
            raise RuntimeError("_int_mm: not compiled for this CPU")

        monkeypatch.setattr(torch, "_int_mm", missing)
        assert cpu_int8_gemm_choice() == "fp32"
    finally:
        GEMM_MODULE._probe.cache_clear()  # the next caller probes the real _int_mm again


def test_environment_forces_a_way_and_rejects_unknown_names(monkeypatch):
    a, b = _codes(4, 40, 6), _codes(5, 40, 7)
    monkeypatch.setenv("BYTETUNE_CPU_INT8_GEMM", "fp32")

    def must_not_run(*args):
        raise AssertionError("torch._int_mm ran although fp32 was forced")

    monkeypatch.setattr(torch, "_int_mm", must_not_run)
    assert torch.equal(int32_matmul_nt(a, b), int32_matmul_nt_exact(a, b))
    monkeypatch.setenv("BYTETUNE_CPU_INT8_GEMM", "float64")
    with pytest.raises(ValueError, match="BYTETUNE_CPU_INT8_GEMM='float64': use one of"):
        int32_matmul_nt(a, b)


def test_forcing_int_mm_where_it_is_wrong_is_an_error(monkeypatch):
    # Held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2), torch 2.13's _int_mm returned -131072 for a product
    # of -16,516,096: forcing it there must say so, not compute a wrong product silently.
    a, b = _codes(4, 40, 6), _codes(5, 40, 7)
    monkeypatch.setenv("BYTETUNE_CPU_INT8_GEMM", "int_mm")
    GEMM_MODULE._probe.cache_clear()
    try:
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32))
        with pytest.raises(ValueError, match="BYTETUNE_CPU_INT8_GEMM=int_mm, but torch._int_mm cannot be used"):
            int32_matmul_nt(a, b)
    finally:
        GEMM_MODULE._probe.cache_clear()
