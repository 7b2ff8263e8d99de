"""LLM.int8() kernels: references against independent float64 math and hand-made cases; Triton
kernels (interpreter on CPU, compiled on CUDA) against the references."""

import importlib
import math

import pytest
import torch

from bytetune.kernels import int8_matmul as public_int8_matmul
from bytetune.kernels.dispatch import HAS_TRITON
from bytetune.kernels.llm_int8 import (
    column_absmax_reference,
    column_absmax_triton,
    int8_matmul_grad_input,
    int8_matmul_grad_input_reference,
    int8_matmul_grad_input_triton,
    int8_linear_fixed_capacity,
    int8_linear_reference,
    int8_matmul_reference,
    int8_matmul_triton,
    outlier_columns,
    outlier_columns_reference,
    outlier_columns_triton,
    quantize_rowwise,
    quantize_rowwise_reference,
    quantize_rowwise_triton,
    quantize_tokenwise,
    quantize_tokenwise_reference,
    quantize_tokenwise_triton,
    select_outlier_columns,
)

from ..conftest import triton_device

KERNEL_MODULE = importlib.import_module("bytetune.kernels.llm_int8")  # for monkeypatching
# The modules of single ops, for their helpers and the globals their functions read.
MATMUL_MODULE = importlib.import_module("bytetune.kernels.llm_int8.matmul")
GRAD_INPUT_MODULE = importlib.import_module("bytetune.kernels.llm_int8.matmul_grad_input")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOKEN_COUNTS = [1, 3, 17, 64]
# K and N deliberately not multiples of 16 (nor of the interpreter's 32-wide tiles).
K, N = 100, 37

# A result rounded to a 16-bit dtype may differ from the reference by one unit in the last
# place: the interpreter's fp32 -> bf16 conversion truncates where torch rounds to nearest.
OUTPUT_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(m, k, dtype, outlier_cols, device, seed=0):
    """Normal activations (|x| < ~4.5 for these sizes) with large values planted in outlier_cols."""
    x = torch.randn(m, k, generator=_generator(seed))
    x = x.clamp(-5.0, 5.0)
    for j, col in enumerate(outlier_cols):
        # One row carries the outlier, the others stay ordinary, as in real activations.
        x[j % m, col] = 25.0 + j if j % 2 == 0 else -(25.0 + j)
    return x.to(dtype).to(device)


def _weight(n, k, dtype, device, seed=1):
    return (torch.randn(n, k, generator=_generator(seed)) * 0.05).to(dtype).to(device)


def _outlier_sets(k):
    return {"none": [], "one": [k // 2], "many": list(range(3, k, 7))}


# ------------------------------------------------------------------------------------------
# References against independent math
# ------------------------------------------------------------------------------------------


def test_rowwise_rounds_half_to_even_and_uses_absmax_scale():
    # absmax 127 makes 127 * w / absmax == w exactly, so every tie is a real tie.
    w = torch.tensor([[127.0, 63.5, 0.5, 1.5, -2.5, -0.5, 2.4999]])
    codes, scale = quantize_rowwise_reference(w)
    assert scale.tolist() == [127.0]
    assert codes.tolist() == [[127, 64, 0, 2, -2, 0, 2]]


def test_rowwise_zero_row_gets_scale_one_and_zero_codes():
    w = torch.zeros(2, 9)
    w[1] = torch.linspace(-1, 1, 9)
    codes, scale = quantize_rowwise(w)
    assert scale.tolist() == [1.0, 1.0]
    assert codes[0].eq(0).all()
    assert codes[1].tolist() == [-127, -95, -64, -32, 0, 32, 64, 95, 127]


@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_stay_within_127_without_a_clamp(dtype):
    # Rows whose absmax spans subnormal to huge magnitudes, each row's maximum planted at every
    # position once: 127 * v / absmax must round to at most 127 in magnitude everywhere.
    gen = _generator(11)
    finfo = torch.finfo(dtype)
    lowest, highest = math.log10(finfo.tiny) - 2, min(30.0, math.log10(finfo.max) - 1)  # subnormal .. huge
    magnitudes = torch.logspace(lowest, highest, 64, dtype=torch.float64).to(dtype).float()
    assert (magnitudes > 0).all() and torch.isfinite(magnitudes).all()
    x = torch.rand(64, 64, generator=gen) * 2 - 1
    x = x * magnitudes[:, None]
    x[torch.arange(64), torch.arange(64)] = -magnitudes  # the row's absmax, negative
    x = x.to(dtype)
    for codes, _ in (quantize_rowwise_reference(x), quantize_tokenwise_reference(x, torch.tensor([1, 5]))):
        assert codes.abs().max() <= 127
    codes, scale = quantize_rowwise_reference(x)
    nonzero = scale > 0
    assert (codes[nonzero].abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rowwise_dequantization_error_is_half_a_step(dtype):
    w = _weight(N, K, dtype, "cpu")
    codes, scale = quantize_rowwise(w)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    w64 = w.double()
    torch.testing.assert_close(scale.double(), w64.abs().amax(dim=1), rtol=0, atol=0)
    step = scale.double()[:, None] / 127
    assert ((codes.double() * step - w64).abs() <= step / 2 * (1 + 1e-6)).all()
    assert codes.abs().amax(dim=1).eq(127).all()


def test_outlier_columns_finds_planted_columns_sorted_unique():
    x = torch.randn(5, 20, generator=_generator(3)).clamp(-2, 2)
    x[0, 17] = 6.0  # exactly the threshold counts
    x[4, 2] = -9.0
    x[1, 2] = 7.0  # a second hit in the same column is reported once
    x[2, 11] = -6.5
    assert outlier_columns(x, 6.0).tolist() == [2, 11, 17]
    assert outlier_columns(x, 9.5).tolist() == []
    assert outlier_columns(x, 0.0).dtype == torch.long
    assert outlier_columns(x, 0.0).numel() == 0  # threshold <= 0: decomposition off


def test_tokenwise_scale_ignores_outlier_columns_and_zeroes_their_codes():
    x = torch.tensor([[1.0, -20.0, 0.5, -2.0], [0.25, 30.0, -0.5, 0.125]])
    codes, scale = quantize_tokenwise(x, torch.tensor([1]))
    assert scale.tolist() == [2.0, 0.5]
    assert codes.tolist() == [[64, 0, 32, -127], [64, 0, -127, 32]]
    codes_all, scale_all = quantize_tokenwise(x)
    assert scale_all.tolist() == [20.0, 30.0]
    assert codes_all[:, 1].tolist() == [-127, 127]


@pytest.mark.parametrize("capacity", [3, 14, 100, 1000])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_select_outlier_columns_is_outlier_columns_within_capacity(capacity, threshold):
    planted = _outlier_sets(K)["many"]  # 14 columns
    x = _activations(17, K, torch.float32, planted, "cpu")
    cols, is_outlier = select_outlier_columns(x, threshold, capacity)
    if threshold <= 0:
        assert cols.numel() == 0 and is_outlier.shape == (K,) and not is_outlier.any()
        return
    assert cols.shape == (min(capacity, K),) and cols.dtype == torch.long
    assert torch.equal(cols, cols.sort().values) and cols.unique().numel() == cols.numel()
    marked = torch.nonzero(is_outlier).flatten()
    if capacity >= len(planted):
        assert torch.equal(marked, outlier_columns_reference(x, threshold))
    else:
        # More columns than the capacity: the `capacity` columns of largest absmax.
        absmax = x.abs().amax(dim=0)
        assert marked.numel() == capacity
        assert absmax[marked].min() >= absmax[~is_outlier].max()
        assert set(marked.tolist()) <= set(planted)
    assert set(marked.tolist()) <= set(cols.tolist())


def test_select_outlier_columns_without_rows_or_capacity():
    assert select_outlier_columns(torch.randn(0, 8), 6.0, 4)[0].numel() == 0
    cols, is_outlier = select_outlier_columns(torch.full((2, 8), 9.0), 6.0, 0)
    assert cols.numel() == 0 and not is_outlier.any()
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        select_outlier_columns(torch.randn(2, 8), 6.0, -1)


def test_tokenwise_accepts_a_column_mask():
    x = _activations(9, K, torch.float32, [3, 50], "cpu")
    mask = torch.zeros(K, dtype=torch.bool)
    mask[[3, 50]] = True
    by_mask = quantize_tokenwise(x, mask)
    by_index = quantize_tokenwise(x, torch.tensor([3, 50]))
    assert torch.equal(by_mask[0], by_index[0]) and torch.equal(by_mask[1], by_index[1])


def test_tokenwise_row_made_only_of_outliers_gets_scale_one():
    x = torch.tensor([[0.0, 9.0], [1.0, 9.0]])
    codes, scale = quantize_tokenwise(x, torch.tensor([1]))
    assert scale.tolist() == [1.0, 1.0]
    assert codes.tolist() == [[0, 0], [127, 0]]


@pytest.mark.parametrize("cpu_gemm", ["int_mm", "fp32"])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_matmul_reference_matches_float64_math(out_dtype, with_bias, cpu_gemm, monkeypatch):
    monkeypatch.setenv("BYTETUNE_CPU_INT8_GEMM", cpu_gemm)
    gen = _generator(4)
    x_codes = torch.randint(-127, 128, (17, K), generator=gen, dtype=torch.int8)
    w_codes = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    x_scale = torch.rand(17, generator=gen) * 4 + 0.1
    w_scale = torch.rand(N, generator=gen) * 0.2 + 0.01
    bias = torch.randn(N, generator=gen).to(out_dtype) if with_bias else None
    out = int8_matmul_reference(x_codes, w_codes, x_scale, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype
    expected = (x_codes.double() @ w_codes.double().T) * x_scale.double()[:, None]
    expected = expected * w_scale.double()[None, :] / 127**2
    if with_bias:
        expected = expected + bias.double()
    torch.testing.assert_close(out.double(), expected.to(out_dtype).double(), rtol=OUTPUT_RTOL[out_dtype], atol=1e-5)


@pytest.mark.parametrize("cpu_gemm", ["int_mm", "fp32"])
def test_int8_product_is_exact_beyond_float32_range(device, cpu_gemm, monkeypatch):
    # Sums above 2**24 with an odd value: a float32 accumulation could not hold them exactly.
    # On CUDA, 3 tokens also exercise the path where torch._int_mm refuses the shape.
    monkeypatch.setenv("BYTETUNE_CPU_INT8_GEMM", cpu_gemm)
    x_codes = torch.full((3, 4096), 127, dtype=torch.int8)
    x_codes[1] = torch.randint(-127, 128, (4096,), generator=_generator(5), dtype=torch.int8)
    w_codes = torch.full((2, 4096), 127, dtype=torch.int8)
    w_codes[1, 0] = 126
    exact = x_codes.long() @ w_codes.long().T
    assert exact[0, 1] == 4095 * 127 * 127 + 127 * 126
    product = MATMUL_MODULE._int32_matmul_nt(x_codes.to(device), w_codes.to(device))
    assert product.dtype == torch.int32
    assert torch.equal(product.cpu().long(), exact)


@pytest.mark.parametrize("chunk_rows", [1, 8, N])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_input_reference_matches_float64_math(dtype, chunk_rows, monkeypatch):
    # Small chunks make the reference loop over several chunks of weight rows, the last one short.
    monkeypatch.setattr(GRAD_INPUT_MODULE, "REFERENCE_GRAD_CHUNK_ELEMENTS", chunk_rows * K + K // 2)
    gen = _generator(6)
    w_codes = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(N, generator=gen) * 0.2 + 0.01
    grad_y = torch.randn(17, N, generator=gen).to(dtype)
    grad_x = int8_matmul_grad_input_reference(grad_y, w_codes, w_scale)
    assert grad_x.dtype == dtype
    expected = grad_y.double() @ (w_codes.double() * w_scale.double()[:, None] / 127)
    torch.testing.assert_close(grad_x.double(), expected.to(dtype).double(), rtol=OUTPUT_RTOL[dtype] + 1e-5, atol=1e-5)


@pytest.mark.parametrize("outliers", ["none", "one", "many"])
def test_decomposed_int8_product_approximates_the_float_product(outliers):
    """The pieces compose to LLM.int8(): int8 part + 16-bit outlier part ~= x @ w.T."""
    cols_list = _outlier_sets(K)[outliers]
    x = _activations(64, K, torch.float32, cols_list, "cpu")
    w = _weight(N, K, torch.float32, "cpu")
    cols = outlier_columns(x, 6.0)
    assert cols.tolist() == sorted(cols_list)
    x_codes, x_scale = quantize_tokenwise(x, cols)
    w_codes, w_scale = quantize_rowwise(w)
    y = public_int8_matmul(x_codes, w_codes, x_scale, w_scale)
    w_dequant = w_codes.float() * w_scale[:, None] / 127
    y = y + x[:, cols] @ w_dequant[:, cols].T
    exact = x @ w.T
    # Each factor is off by at most half a step; the error grows like sqrt(K) steps.
    assert (y - exact).abs().max() < 0.05 * exact.abs().max()
    if cols_list:
        # Without the decomposition the outliers would blow up the activation scales.
        x_codes_plain, x_scale_plain = quantize_tokenwise(x)
        y_plain = public_int8_matmul(x_codes_plain, w_codes, x_scale_plain, w_scale)
        assert (y - exact).abs().max() < (y_plain - exact).abs().max()


# The layer's forward: the CPU path (only the marked outlier columns) against the GPU path's
# fixed-capacity composition, here run with the reference ops. The two differ only in the order
# the 16-bit products are summed, never in which columns are outliers or in the codes.
LAYER_CASES = {
    "no outliers": dict(outliers=[], capacity=64),
    "one": dict(outliers=[K // 2], capacity=64),
    "many within capacity": dict(outliers=list(range(3, K, 7)), capacity=14),
    "more than capacity": dict(outliers=list(range(3, K, 7)), capacity=5),
    "capacity 0": dict(outliers=[3, 50], capacity=0),
    "capacity above K": dict(outliers=[3, 50], capacity=1000),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 17])
def test_cpu_layer_path_equals_the_fixed_capacity_composition(case, dtype, m):
    outliers, capacity = LAYER_CASES[case]["outliers"], LAYER_CASES[case]["capacity"]
    x = _activations(m, K, dtype, outliers, "cpu", seed=m)
    w_int8, w_scale = quantize_rowwise_reference(_weight(N, K, torch.float32, "cpu"))
    bias = torch.randn(N, generator=_generator(5)).to(dtype)
    got = int8_linear_reference(x, w_int8, w_scale, bias, 6.0, capacity)
    expected = int8_linear_fixed_capacity(x, w_int8, w_scale, bias, 6.0, capacity)
    assert got.dtype == dtype and got.shape == (m, N)
    torch.testing.assert_close(got, expected, rtol=OUTPUT_RTOL[dtype], atol=OUTPUT_RTOL[dtype])
    if outliers and capacity > 0:
        # The outlier columns really took the 16-bit path: the pure-int8 product differs.
        int8_only = int8_linear_reference(x, w_int8, w_scale, bias, 0.0, capacity)
        assert not torch.allclose(got.float(), int8_only.float(), rtol=1e-2, atol=1e-2)


def test_cpu_layer_path_keeps_an_inf_outlier_out_of_the_other_columns():
    x = _activations(4, K, torch.float32, [], "cpu")
    x[1, 7] = float("inf")
    w_int8, w_scale = quantize_rowwise_reference(_weight(N, K, torch.float32, "cpu"))
    y = int8_linear_reference(x, w_int8, w_scale, None, 6.0, 64)
    # Row 1 meets the inf in its 16-bit product; the others' codes and scales never see it.
    assert torch.isfinite(y[[0, 2, 3]]).all() and not torch.isfinite(y[1]).all()
    torch.testing.assert_close(y[[0, 2, 3]], int8_linear_fixed_capacity(x, w_int8, w_scale, None, 6.0, 64)[[0, 2, 3]])


def test_cpu_layer_path_without_rows():
    w_int8, w_scale = quantize_rowwise_reference(_weight(N, K, torch.float32, "cpu"))
    assert int8_linear_reference(torch.randn(0, K), w_int8, w_scale, None, 6.0, 64).shape == (0, N)


# ------------------------------------------------------------------------------------------
# Input checks and dispatch
# ------------------------------------------------------------------------------------------


def test_bad_inputs_raise_errors_naming_the_problem():
    w = torch.randn(4, 8)
    codes, scale = quantize_rowwise(w)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rowwise(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_tokenwise(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="outlier_cols must be a 1-D tensor of column indices"):
        quantize_tokenwise(w, torch.zeros(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="int8"):
        public_int8_matmul(codes.float(), codes, scale, scale)
    with pytest.raises(ValueError, match="disagree on K"):
        public_int8_matmul(codes[:, :7], codes, scale, scale)
    with pytest.raises(ValueError, match="x_scale must be float32 of shape"):
        public_int8_matmul(codes, codes, scale.half(), scale)
    with pytest.raises(ValueError, match="bias"):
        public_int8_matmul(codes, codes, scale, scale, bias=torch.zeros(5))
    with pytest.raises(ValueError, match="grad_y"):
        int8_matmul_grad_input(torch.randn(3, 5), codes, scale)


def test_cpu_tensors_use_the_reference(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the Triton path ran for a CPU tensor")

    for op in ["quantize_rowwise", "column_absmax", "outlier_columns", "quantize_tokenwise", "int8_matmul", "int8_matmul_grad_input"]:
        monkeypatch.setattr(KERNEL_MODULE, f"{op}_triton", must_not_run)
    x = torch.randn(3, 8)
    codes, scale = quantize_rowwise(x)
    quantize_tokenwise(x, outlier_columns(x, 1.0))
    out = public_int8_matmul(codes, codes, scale, scale)
    assert torch.equal(out, KERNEL_MODULE.int8_matmul_reference(codes, codes, scale, scale))
    grad_y = torch.randn(3, 3)
    grad_x = int8_matmul_grad_input(grad_y, codes, scale)
    assert torch.equal(grad_x, KERNEL_MODULE.int8_matmul_grad_input_reference(grad_y, codes, scale))


# ------------------------------------------------------------------------------------------
# Triton kernels against the references (interpreter on CPU)
# ------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 100), (5, 300), (2, 257)])
def test_triton_rowwise_codes_match_exactly(shape, dtype, device):
    w = _weight(*shape, dtype, device, seed=shape[1])
    w[0, : shape[1] // 2] = 0  # partly zero row, and a fully zero row when there are enough
    if shape[0] > 2:
        w[2] = 0
    codes, scale = quantize_rowwise_triton(w)
    ref_codes, ref_scale = quantize_rowwise_reference(w)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes, ref_codes)


@needs_triton
def test_triton_rowwise_rounds_ties_like_torch(device):
    w = torch.tensor([[127.0, 63.5, 0.5, 1.5, -2.5, -0.5, 2.4999, -126.5, 125.5]], device=device)
    assert quantize_rowwise_triton(w)[0].tolist() == [[127, 64, 0, 2, -2, 0, 2, -126, 126]]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 17, 130])
def test_triton_outlier_columns_match(m, dtype, device):
    x = _activations(m, K, dtype, _outlier_sets(K)["many"], device, seed=m)
    x[m - 1, 1] = 6.0  # on the threshold
    for threshold in [6.0, 10.5, 0.0]:
        expected = outlier_columns_reference(x, threshold)
        assert torch.equal(outlier_columns_triton(x, threshold), expected)
    assert 1 in outlier_columns_triton(x, 6.0).tolist()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [0, 1, 130])
def test_triton_column_absmax_matches_exactly(m, dtype, device):
    x = _activations(m, K, dtype, _outlier_sets(K)["many"] if m else [], device, seed=m)
    assert torch.equal(column_absmax_triton(x), column_absmax_reference(x))
    strided = x.t().contiguous().t()
    assert torch.equal(column_absmax_triton(strided), column_absmax_reference(x))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_tokenwise_codes_match_with_a_column_mask(dtype, device):
    x = _activations(17, K, dtype, _outlier_sets(K)["many"], device, seed=3)
    mask = torch.zeros(K, dtype=torch.bool, device=device)
    mask[_outlier_sets(K)["many"]] = True
    codes, scale = quantize_tokenwise_triton(x, mask)
    ref_codes, ref_scale = quantize_tokenwise_reference(x, mask)
    assert torch.equal(scale, ref_scale) and torch.equal(codes, ref_codes)


# The interpreter runs this kernel one row per program, slowly: every token count in fp32, and
# the 16-bit dtypes (which only change the loads) at two token counts.
TOKENWISE_CASES = [(m, torch.float32) for m in TOKEN_COUNTS] + [
    (m, dtype) for m in (1, 17) for dtype in (torch.bfloat16, torch.float16)
]


@needs_triton
@pytest.mark.parametrize("outliers", ["none", "one", "many"])
@pytest.mark.parametrize("m, dtype", TOKENWISE_CASES)
def test_triton_tokenwise_codes_match_exactly(m, dtype, outliers, device):
    cols_list = _outlier_sets(K)[outliers]
    x = _activations(m, K, dtype, cols_list, device, seed=m)
    cols = torch.tensor(cols_list, dtype=torch.long, device=device) if cols_list else None
    codes, scale = quantize_tokenwise_triton(x, cols)
    ref_codes, ref_scale = quantize_tokenwise_reference(x, cols)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes, ref_codes)


@needs_triton
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", TOKEN_COUNTS)
def test_triton_int8_matmul_matches(m, with_bias, out_dtype, device):
    gen = _generator(m)
    x_codes = torch.randint(-127, 128, (m, K), generator=gen, dtype=torch.int8).to(device)
    w_codes = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(device)
    x_scale = (torch.rand(m, generator=gen) * 4 + 0.1).to(device)
    w_scale = (torch.rand(N, generator=gen) * 0.2 + 0.01).to(device)
    bias = torch.randn(N, generator=gen).to(out_dtype).to(device) if with_bias else None
    out = int8_matmul_triton(x_codes, w_codes, x_scale, w_scale, bias, out_dtype)
    expected = int8_matmul_reference(x_codes, w_codes, x_scale, w_scale, bias, out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, N)
    torch.testing.assert_close(out, expected, rtol=OUTPUT_RTOL[out_dtype], atol=1e-5)


@needs_triton
def test_triton_int8_matmul_accepts_strided_codes(device):
    gen = _generator(7)
    x_wide = torch.randint(-127, 128, (17, 2 * K), generator=gen, dtype=torch.int8).to(device)
    x_codes = x_wide[:, ::2]  # a non-contiguous view
    w_codes = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(device)
    x_scale = (torch.rand(17, generator=gen) + 0.5).to(device)
    w_scale = (torch.rand(N, generator=gen) + 0.5).to(device)
    out = int8_matmul_triton(x_codes, w_codes, x_scale, w_scale)
    expected = int8_matmul_reference(x_codes.contiguous(), w_codes, x_scale, w_scale)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", TOKEN_COUNTS)
def test_triton_grad_input_matches(m, dtype, device):
    gen = _generator(100 + m)
    w_codes = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(device)
    w_scale = (torch.rand(N, generator=gen) * 0.2 + 0.01).to(device)
    grad_y = torch.randn(m, N, generator=gen).to(dtype).to(device)
    grad_x = int8_matmul_grad_input_triton(grad_y, w_codes, w_scale)
    expected = int8_matmul_grad_input_reference(grad_y, w_codes, w_scale)
    assert grad_x.dtype == dtype and grad_x.shape == (m, K)
    if dtype == torch.float32:
        torch.testing.assert_close(grad_x, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    else:
        # 16-bit: the kernel's weight tile is rounded to the 16-bit dtype before the product
        # (the reference keeps it in fp32), and the output is rounded once more.
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(grad_x.float(), expected.float(), rtol=OUTPUT_RTOL[dtype], atol=2e-3 * scale)


@needs_triton
def test_triton_and_reference_agree_on_an_empty_token_batch(device):
    x = torch.randn(0, K, device=device)
    w_codes, w_scale = quantize_rowwise_reference(_weight(N, K, torch.float32, device))
    for impl in ("reference", "triton"):
        ops = {name: getattr(KERNEL_MODULE, f"{name}_{impl}") for name in
               ["outlier_columns", "quantize_tokenwise", "int8_matmul", "int8_matmul_grad_input"]}
        assert ops["outlier_columns"](x, 6.0).shape == (0,)
        x_codes, x_scale = ops["quantize_tokenwise"](x)
        assert x_codes.shape == (0, K) and x_scale.shape == (0,)
        assert ops["int8_matmul"](x_codes, w_codes, x_scale, w_scale).shape == (0, N)
        grad_y = torch.randn(0, N, device=device)
        assert ops["int8_matmul_grad_input"](grad_y, w_codes, w_scale).shape == (0, K)


@needs_triton
def test_column_offsets_are_int64_past_2_pow_31():
    """A column-major activation [S, K] with S * K >= 2^31 (S = 2^20 + 7 tokens, K = 2056): the
    row quantizer and the column absmax read column c at c * S elements, past 2^31 from c = 2048
    on, where an int32 product wraps. Three of its rows are quantized: only their pages are ever
    written (~8 MB); the rest of the buffer is untouched virtual memory. The view starts 2^31
    elements into its buffer, so a wrapped (negative) offset still reads mapped memory -- zeros,
    not the row -- and the test fails instead of crashing."""
    tokens, k = 2**20 + 7, 2056
    offset = 2**31
    try:
        buffer = torch.empty(offset + k * tokens, dtype=torch.float16, device=triton_device())
    except (RuntimeError, torch.OutOfMemoryError) as error:  # strict overcommit, a small GPU
        pytest.skip(f"cannot reserve {2 * (offset + k * tokens) / 2**30:.1f} GiB of address space: {error}")
    column_major = buffer[offset:].view(k, tokens).t()
    assert column_major.stride() == (1, tokens) and (k - 1) * tokens >= 2**31
    x = column_major[:3]
    x.copy_(torch.randn(3, k, generator=torch.Generator().manual_seed(17)))
    dense = x.cpu().contiguous()
    codes, scale = quantize_rowwise_triton(x)
    expected_codes, expected_scale = quantize_rowwise_reference(dense)
    assert torch.equal(scale.cpu(), expected_scale)
    assert torch.equal(codes.cpu(), expected_codes)
    assert torch.equal(column_absmax_triton(x).cpu(), column_absmax_reference(dense))
