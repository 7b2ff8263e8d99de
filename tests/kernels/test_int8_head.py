"""Weight-only int8 matmul (the int8 head) and the int8 embedding gather: the reference against
float64 math on the dequantized weight, the Triton kernel (interpreter on CPU) against the
reference, at odd shapes."""

import pytest
import torch

from bytetune.kernels import int8_head
from bytetune.kernels.dispatch import HAS_TRITON
from bytetune.kernels.int8_head import (
    GPU_CONFIGS,
    embedding_lookup,
    quantize_rowwise,
    weight_only_matmul,
    weight_only_matmul_reference,
    weight_only_matmul_triton,
)

from ..conftest import triton_device

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DTYPES = [torch.float32, torch.bfloat16]
# 16-bit outputs may differ by one unit in the last place (the interpreter truncates to bf16).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
# (tokens, vocab rows): vocab sizes around tile and power-of-two edges, 1-token decoding.
SHAPES = [(1, 1), (17, 255), (5, 257), (3, 4097)]
HIDDEN = 100  # not a multiple of the tiles either


def _case(m, n, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] *= 20  # rows of very different scales
    w_int8, w_scale = quantize_rowwise(w.to(device))
    return x, w_int8, w_scale


def _float64_product(x, w_int8, w_scale):
    weight = w_int8.double() * (w_scale.double() / 127.0)[:, None]
    return x.double() @ weight.t()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", SHAPES)
def test_reference_equals_float64_math_on_the_dequantized_weight(m, n, dtype):
    x, w_int8, w_scale = _case(m, n, HIDDEN, dtype, "cpu")
    out = weight_only_matmul_reference(x, w_int8, w_scale)
    assert out.dtype == dtype and out.shape == (m, n)
    expected = _float64_product(x, w_int8, w_scale)
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=RTOL[dtype], atol=1e-5)


def test_reference_is_close_to_the_float_weight_it_stands_for():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(9, 64, generator=g), torch.randn(300, 64, generator=g)
    out = weight_only_matmul_reference(x, *quantize_rowwise(w))
    exact = x @ w.t()
    # Per-row rounding error <= absmax/254 per weight: relative error of a dot product ~1 %.
    assert (out - exact).norm() / exact.norm() < 0.01


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n", SHAPES)
def test_triton_kernel_matches_the_reference(m, n, dtype, device):
    x, w_int8, w_scale = _case(m, n, HIDDEN, dtype, device, seed=m + n)
    out = weight_only_matmul_triton(x, w_int8, w_scale)
    expected = weight_only_matmul_reference(x.cpu(), w_int8.cpu(), w_scale.cpu())
    torch.testing.assert_close(out.cpu().double(), expected.double(), rtol=RTOL[dtype], atol=1e-4)


@needs_triton
def test_public_op_dispatches_to_triton_when_forced(monkeypatch):
    x, w_int8, w_scale = _case(4, 33, 40, torch.float32, "cpu")
    launched = []
    kernel = int8_head._weight_only_matmul_kernel
    monkeypatch.setattr(int8_head, "_weight_only_matmul_kernel", _Recording(kernel, launched))
    monkeypatch.setenv("BYTETUNE_FORCE_TRITON", "1")
    device = triton_device()  # a compiled kernel reads GPU memory only
    forced = weight_only_matmul(x.to(device), w_int8.to(device), w_scale.to(device)).cpu()
    assert launched == [1]
    monkeypatch.delenv("BYTETUNE_FORCE_TRITON")
    torch.testing.assert_close(forced, weight_only_matmul(x, w_int8, w_scale), rtol=1e-5, atol=1e-6)
    assert launched == [1]  # CPU tensors, not forced: the reference


class _Recording:
    def __init__(self, kernel, launched):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        self.launched.append(1)
        return self.kernel[grid]


def test_gpu_configs_are_an_explicit_small_list():
    assert set(GPU_CONFIGS) == {"many_tokens", "few_tokens", "fp32"}
    for config in GPU_CONFIGS.values():
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"} <= config.keys()


def test_bad_inputs_name_the_problem():
    x, w_int8, w_scale = _case(2, 5, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="int8"):
        weight_only_matmul_reference(x, w_int8.float(), w_scale)
    with pytest.raises(ValueError, match="disagree"):
        weight_only_matmul_reference(x[:, :7], w_int8, w_scale)
    with pytest.raises(ValueError, match="w_scale"):
        weight_only_matmul_reference(x, w_int8, w_scale.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 257, 4097])
def test_embedding_lookup_dequantizes_only_the_gathered_rows(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    table = torch.randn(vocab, 24, generator=g)
    w_int8, w_scale = quantize_rowwise(table)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    out = embedding_lookup(ids, w_int8, w_scale, dtype)
    assert out.shape == (3, 11, 24) and out.dtype == dtype
    expected = (w_int8.double() * (w_scale.double() / 127.0)[:, None])[ids]
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=RTOL[dtype], atol=1e-6)
    # and the rows are within half a quantization step of the float table
    step = (table.abs().amax(1) / 127.0)[ids]
    assert ((out.float() - table[ids]).abs() <= step[..., None] * 0.5 + (0.01 if dtype != torch.float32 else 1e-6)).all()
