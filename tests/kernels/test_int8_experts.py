"""The grouped int8 expert GEMM: Triton kernels (interpreter) against the PyTorch reference, and
the reference against a float64 oracle of LLM.int8()'s math, at small odd shapes."""

from __future__ import annotations

import pytest
import torch

from bytetune.kernels import int8_experts as ie
from bytetune.kernels.dispatch import HAS_TRITON
from bytetune.kernels.llm_int8 import quantize_tokenwise_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _routing(counts: list[int], gen: torch.Generator):
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    return ie.sort_by_expert(ids, len(counts))


def _case(counts, n, k, dtype=torch.float32, seed=0, outlier_cols=()):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    for col in outlier_cols:
        x[:, col] *= 20  # columns past the threshold
    w = torch.randn(len(counts), n, k, generator=gen) * 0.1
    w_int8, w_scale = ie.quantize_experts(w)
    _, offsets = _routing(counts, gen)
    return x, w, w_int8, w_scale, offsets


def _oracle(x, w_int8, w_scale, offsets, threshold):
    """LLM.int8() per expert in float64, written from the paper's rule (no bytetune op)."""
    y = torch.zeros(x.shape[0], w_int8.shape[1], dtype=torch.float64)
    bounds = offsets.tolist()
    for e in range(w_int8.shape[0]):
        xe = x[bounds[e] : bounds[e + 1]].double()
        if xe.shape[0] == 0:
            continue
        we = w_int8[e].double() * w_scale[e].double()[:, None] / 127
        outliers = (xe.abs().amax(0) >= threshold) if threshold > 0 else torch.zeros(xe.shape[1], dtype=torch.bool)
        x_int = xe.masked_fill(outliers[None, :], 0)
        scale = x_int.abs().amax(1, keepdim=True).clamp_min(1e-30)
        codes = torch.round(x_int * 127 / scale)
        y[bounds[e] : bounds[e + 1]] = (codes * scale / 127) @ we.t() + xe[:, outliers] @ we[:, outliers].t()
    return y


COUNTS = [[5, 0, 17, 1], [0, 0, 3], [33, 2, 0, 0, 9], [1]]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_reference_matches_float64_oracle(counts, threshold):
    x, _, w_int8, w_scale, offsets = _case(counts, n=23, k=37, outlier_cols=(3, 30))
    y = ie.grouped_int8_linear_reference(x, w_int8, w_scale, offsets, threshold, outlier_capacity=37)
    expected = _oracle(x, w_int8, w_scale, offsets, threshold)
    scale = expected.abs().max().clamp_min(1.0)
    assert (y.double() - expected).abs().max() <= 1e-5 * scale


def test_outlier_columns_are_exact_in_16_bit():
    # An expert whose tokens have one huge column: with the decomposition its error is that of
    # the other columns only; without it, the huge column swamps every token's int8 scale.
    x, w, w_int8, w_scale, offsets = _case([9, 7], n=16, k=24, outlier_cols=(5,))
    x[:, 5] *= 50
    exact = torch.cat([x[: offsets[1]] @ ie.dequantize_experts(w_int8, w_scale)[0].t(),
                       x[offsets[1]:] @ ie.dequantize_experts(w_int8, w_scale)[1].t()])  # fmt: skip
    err_with = (ie.grouped_int8_linear_reference(x, w_int8, w_scale, offsets, 6.0, 24) - exact).abs().max()
    err_without = (ie.grouped_int8_linear_reference(x, w_int8, w_scale, offsets, 0.0, 24) - exact).abs().max()
    assert err_with * 10 < err_without


def test_sort_by_expert_and_dropped_slots():
    ids = torch.tensor([[2, 0], [4, 2], [1, 2]])  # 4 is not a local expert of 3
    order, offsets = ie.sort_by_expert(ids, 3)
    assert offsets.tolist() == [0, 1, 2, 5]
    flat = ids.reshape(-1)[order]
    assert flat[:5].tolist() == [0, 1, 2, 2, 2] and flat[5].item() == 4
    assert order[2:5].tolist() == [0, 3, 5]  # stable


@pytest.mark.parametrize("counts", [[5, 0, 17, 1], [0, 0, 0], [40, 1]])
def test_tile_table_covers_every_row_once(counts):
    _, offsets = ie.sort_by_expert(torch.cat([torch.full((c,), e) for e, c in enumerate(counts)]).long(), len(counts))
    rows = sum(counts)
    expert, start, stop = ie.tile_table(offsets, 16, rows)
    covered = torch.zeros(rows, dtype=torch.long)
    for e, a, b in zip(expert.tolist(), start.tolist(), stop.tolist()):
        assert b - a <= 16
        if b > a:
            assert offsets[e] <= a and b <= offsets[e + 1]
            covered[a:b] += 1
    assert covered.eq(1).all()


@needs_triton
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_triton_matches_reference(counts, dtype, threshold):
    x, _, w_int8, w_scale, offsets = _case(counts, n=41, k=45, dtype=dtype, seed=1, outlier_cols=(0, 17, 44))
    for capacity in (2, 45):  # fewer slots than outlier columns, and room for all
        ref = ie.grouped_int8_linear_reference(x, w_int8, w_scale, offsets, threshold, capacity)
        tri = ie.grouped_int8_linear_triton(x, w_int8, w_scale, offsets, threshold, capacity)
        assert tri.dtype == dtype and tri.shape == ref.shape
        tol = (1e-5 if dtype == torch.float32 else 2e-2) * ref.float().abs().max().clamp_min(1.0)
        assert (tri.float() - ref.float()).abs().max() <= tol


@needs_triton
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_grad_input_matches_reference_and_oracle(counts, dtype):
    gen = torch.Generator().manual_seed(2)
    _, _, w_int8, w_scale, offsets = _case(counts, n=29, k=19, seed=2)
    grad_y = torch.randn(sum(counts), 29, generator=gen).to(dtype)
    ref = ie.grouped_int8_grad_input_reference(grad_y, w_int8, w_scale, offsets)
    tri = ie.grouped_int8_grad_input_triton(grad_y, w_int8, w_scale, offsets)
    w = ie.dequantize_experts(w_int8, w_scale, torch.float64)
    bounds = offsets.tolist()
    oracle = torch.cat([grad_y[a:b].double() @ w[e] for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
    tol = (1e-5 if dtype == torch.float32 else 2e-2) * oracle.abs().max().clamp_min(1.0)
    assert (ref.double() - oracle).abs().max() <= tol
    assert (tri.double() - oracle).abs().max() <= tol


@needs_triton
def test_nan_and_inf_stay_in_their_rows():
    counts = [6, 0, 11]
    x, _, w_int8, w_scale, offsets = _case(counts, n=20, k=33, seed=3, outlier_cols=(4,))
    x[2, 7] = float("nan")  # expert 0
    x[9, 4] = float("inf")  # expert 2, in the outlier column
    x[12, 20] = float("-inf")  # expert 2, an ordinary column: becomes an outlier column of expert 2
    for fn in (ie.grouped_int8_linear_reference, ie.grouped_int8_linear_triton):
        y = fn(x, w_int8, w_scale, offsets, 6.0, 33)
        bad_rows = {2, 9, 12}
        for row in range(x.shape[0]):
            if row in bad_rows:
                continue
            assert torch.isfinite(y[row]).all(), (fn.__name__, row)
        assert not torch.isfinite(y[9]).all() and not torch.isfinite(y[12]).all()
    ref = ie.grouped_int8_linear_reference(x, w_int8, w_scale, offsets, 6.0, 33)
    tri = ie.grouped_int8_linear_triton(x, w_int8, w_scale, offsets, 6.0, 33)
    good = [r for r in range(x.shape[0]) if r not in (2, 9, 12)]
    assert torch.allclose(tri[good], ref[good], rtol=1e-5, atol=1e-5 * ref[good].abs().max().item())
    assert torch.isnan(ref[2]).all()
    # The NaN row: NaN in the Triton path too once the token quantizer propagates NaN into its
    # scale (torch's amax does; the Triton quantizer's tl.max did not before i17k's change).
    _, scale = ie.quantize_tokenwise(x[2:3])
    if torch.isnan(scale).all():
        assert torch.isnan(tri[2]).all()


@needs_triton
def test_column_absmax_triton_matches_reference_with_nan():
    x, _, _, _, offsets = _case([7, 0, 20], n=4, k=50, seed=4)
    x[3, 11] = float("nan")
    x[10, 2] = float("-inf")
    ref = ie.expert_column_absmax_reference(x, offsets)
    tri = ie.expert_column_absmax_triton(x, offsets)
    assert torch.equal(torch.isnan(ref), torch.isnan(tri)) and torch.isnan(tri[0, 11])
    assert torch.equal(ref.nan_to_num(), tri.nan_to_num()) and tri[1].eq(0).all()


def test_quantize_tokenwise_reference_is_what_the_experts_use():
    # The grouped path quantizes each token with llm_int8's quantizer: codes of one expert's
    # rows do not depend on other experts' rows.
    x, _, _, _, _ = _case([4, 4], n=4, k=8, seed=5)
    codes_all, scale_all = quantize_tokenwise_reference(x)
    codes_half, scale_half = quantize_tokenwise_reference(x[:4])
    assert torch.equal(codes_all[:4], codes_half) and torch.equal(scale_all[:4], scale_half)
