"""NaN and Inf reach the scales of every quantizing kernel as they reach the references' (torch's
amax keeps NaN). ``tl.max`` / ``tl.maximum`` on floats compile to PTX ``max.f32``, which drops
NaN, and the interpreter models that (np.fmax / np.nanmax): before the fix a NaN activation got a
finite scale and code -127, and a NaN column was never an outlier.

Contract checked: every scale / absmax equal to the reference's bit for bit (NaN where the
reference has NaN); every code equal wherever value / scale is finite. The codes of the other
elements (a NaN, or an inf over an inf scale) are unspecified: NaN to int is undefined in torch too.
"""

import pytest
import torch
from torch import nn

from bytetune.kernels import blockwise, dispatch, groupwise, llm_int8
from bytetune.kernels.optim_update import (
    CodeBook,
    UpdateKind,
    optimizer_update_8bit_reference,
    optimizer_update_8bit_triton,
)
from bytetune.kernels.quant_maps import dynamic_map
from bytetune.quant_layers.int8_embedding import Int8Embedding, Int8Head

from ..conftest import triton_device
from .test_optim_update import Problem, _scalars

pytestmark = pytest.mark.skipif(not dispatch.HAS_TRITON, reason="triton is not installed")
NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _same_scales(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True)


def _same_codes_where_defined(actual: torch.Tensor, expected: torch.Tensor, defined: torch.Tensor) -> None:
    assert defined.any()
    assert torch.equal(actual.cpu()[defined], expected.cpu()[defined])


def _planted(rows: int, cols: int, dtype, seed: int) -> torch.Tensor:
    """Random rows, some holding NaN, +inf, -inf (one of them both NaN and inf) at random
    columns; the other rows finite."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    bad_rows = torch.randperm(rows, generator=gen)[:4].tolist()
    for row, values in zip(bad_rows, [(NAN,), (INF,), (-INF,), (NAN, INF)]):
        for value, col in zip(values, torch.randperm(cols, generator=gen).tolist()):
            x[row, col] = value
    return x.to(dtype)


def _row_codes_defined(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x.float()) & ~torch.isnan(scale)[:, None]


def test_the_issue_repro_gives_a_nan_scale():
    x = torch.tensor([[1.0, NAN, -2.0, 0.5]], device=triton_device())
    codes, scale = llm_int8.quantize_rowwise_triton(x)
    assert torch.isnan(scale).all()  # was 2.0, with codes [64, -127, -127, 32]
    _same_scales(scale, llm_int8.quantize_rowwise_reference(x.cpu())[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_row_quantization_keeps_nan_and_inf(dtype, seed):
    x = _planted(9, 37, dtype, seed)
    expected_codes, expected_scale = llm_int8.quantize_rowwise_reference(x)
    assert torch.isnan(expected_scale).sum() == 2 and torch.isinf(expected_scale).sum() == 2
    codes, scale = llm_int8.quantize_rowwise_triton(x.to(triton_device()))
    _same_scales(scale, expected_scale)
    _same_codes_where_defined(codes, expected_codes, _row_codes_defined(x, expected_scale))


@pytest.mark.parametrize("as_mask", [True, False])
def test_tokenwise_quantization_keeps_nan_outside_the_outlier_columns(as_mask):
    x = _planted(11, 40, torch.float32, seed=3)
    bad_cols = (~torch.isfinite(x)).any(0).nonzero().flatten()
    outliers = bad_cols[:2]  # the NaN / inf of these columns take the 16-bit path, not the scale
    cols = torch.zeros(40, dtype=torch.bool).index_fill_(0, outliers, True) if as_mask else outliers
    expected_codes, expected_scale = llm_int8.quantize_tokenwise_reference(x, cols)
    codes, scale = llm_int8.quantize_tokenwise_triton(x.to(triton_device()), cols.to(triton_device()))
    _same_scales(scale, expected_scale)
    in_int8_part = x.clone().index_fill_(1, outliers, 0)
    _same_codes_where_defined(codes, expected_codes, _row_codes_defined(in_int8_part, expected_scale))


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_absmax_and_outlier_search_keep_nan_and_inf(dtype):
    x = _planted(70, 45, dtype, seed=5).t().contiguous().t()  # column-major, 70 rows: 2 row chunks
    x[3, 7] = 7.0  # a NaN column with an outlier-sized value: still NaN, never an outlier
    x[20, 7] = NAN
    device_x = x.to(triton_device())
    expected = llm_int8.column_absmax_reference(x)
    assert torch.isnan(expected).sum() >= 2 and torch.isinf(expected).sum() >= 1
    _same_scales(llm_int8.column_absmax_triton(device_x), expected)
    assert torch.equal(llm_int8.outlier_columns_triton(device_x, 6.0).cpu(), llm_int8.outlier_columns_reference(x, 6.0))


@pytest.mark.parametrize("block_size", [64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_blockwise_quantization_keeps_nan_and_inf(block_size, dtype):
    x = _planted(6, 181, dtype, seed=block_size).flatten()  # 1086 elements: a ragged last block
    code_map = dynamic_map(True)
    expected_codes, expected_absmax = blockwise.quantize_blockwise_reference(x, code_map, block_size)
    assert not torch.isfinite(expected_absmax).all()
    codes, absmax = blockwise.quantize_blockwise_triton(x.to(triton_device()), code_map.to(triton_device()), block_size)
    _same_scales(absmax, expected_absmax)
    block_absmax = expected_absmax.repeat_interleave(block_size)[: x.numel()]
    _same_codes_where_defined(codes, expected_codes, torch.isfinite(x.float()) & ~torch.isnan(block_absmax))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_groupwise_quantization_keeps_nan_and_inf(bits, dtype):
    w = _planted(7, 96, dtype, seed=bits)  # three groups of 32
    expected_codes, expected_scales = groupwise.quantize_groupwise_reference(w, bits, 32)
    assert torch.isnan(expected_scales).sum() == 2  # before the fix: 1.0, a silently finite scale
    codes, scales = groupwise.quantize_groupwise_triton(w.to(triton_device()), bits, 32)
    _same_scales(scales, expected_scales)
    defined = torch.isfinite(w.float()) & ~torch.isnan(groupwise.expand_group_scales(expected_scales, 32, 96))
    if bits == 4:  # a byte holds columns 2j and 2j + 1
        defined = defined[:, 0::2] & defined[:, 1::2]
    _same_codes_where_defined(codes, expected_codes, defined)


def test_int8_embedding_and_head_keep_a_nan_row(monkeypatch):
    table = _planted(13, 24, torch.float32, seed=8)
    expected_codes, expected_scale = llm_int8.quantize_rowwise_reference(table)
    monkeypatch.setenv("BYTETUNE_FORCE_TRITON", "1")  # CPU tensors under the interpreter
    embedding = Int8Embedding.from_embedding(nn.Embedding.from_pretrained(table.to(triton_device())))
    head = Int8Head.from_linear(nn.Linear(24, 13, bias=False, device=triton_device()).requires_grad_(False))
    head.set_weight(table.to(triton_device()))
    for layer in (embedding, head):
        _same_scales(layer.row_scale if isinstance(layer, Int8Head) else layer.weight_scale, expected_scale)
        _same_codes_where_defined(layer.weight, expected_codes, _row_codes_defined(table, expected_scale))


@pytest.mark.parametrize("kind", [UpdateKind.ADAM, UpdateKind.LION])
def test_optimizer_requantization_keeps_a_nan_state(kind):
    """A NaN param under L2 decay (Adam here) makes a NaN state: its block's absmax must be NaN,
    as in the reference (before the fix, a finite absmax over codes that read back as -absmax).
    Without L2 decay (Lion here) the states stay finite, as in the reference (the kernel used to
    add 0 * NaN to the gradient)."""
    problem = Problem([(600,), (70,)], torch.float32, "cpu", seed=4)
    problem.params[0][300] = NAN  # block 1 of 3
    problem.grads[1][5] = 3e19  # finite, but its square overflows: v's absmax is inf
    reference = problem.clone()
    reference.run(optimizer_update_8bit_reference, kind, False)
    device = triton_device()
    on_device = problem.clone()
    on_device.params = [p.to(device) for p in on_device.params]
    on_device.grads = [g.to(device) for g in on_device.grads]
    on_device.codes = [[c.to(device) for c in cs] for cs in on_device.codes]
    on_device.absmax = [[a.to(device) for a in As] for As in on_device.absmax]
    on_device.books = [CodeBook.of(dynamic_map(signed, device)) for signed in (True, False)]
    on_device.run(optimizer_update_8bit_triton, kind, False)
    states = 2 if kind == UpdateKind.ADAM else 1
    for k in range(states):
        for expected, actual in zip(reference.absmax[k], on_device.absmax[k]):
            assert torch.equal(torch.isnan(actual.cpu()), torch.isnan(expected))
            assert torch.equal(torch.isinf(actual.cpu()), torch.isinf(expected))
            finite = torch.isfinite(expected)
            torch.testing.assert_close(actual.cpu()[finite], expected[finite], rtol=1e-5, atol=0)
    # Adam's L2 decay carries the NaN param into its block's states; Lion's decoupled decay does not.
    assert bool(torch.isnan(reference.absmax[0][0][1])) == (kind == UpdateKind.ADAM)
    assert not torch.isnan(reference.absmax[0][0][0])
