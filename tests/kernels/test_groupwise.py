"""Group-wise (ZeroQuant) kernels: Triton (interpreter on CPU) against the PyTorch references, and
the references against independent float math."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from bytetune.kernels import groupwise as gw
from bytetune.kernels import llm_int8

WEIGHT_CASES = [  # (out, in, group_size): one group, ragged last group, several full groups
    (1, 32, 32),
    (7, 200, 64),
    (9, 256, 128),
]
MATMUL_CASES = [  # (tokens, in, out, group_size)
    (1, 64, 16, 32),
    (33, 200, 40, 64),
    (65, 256, 70, 128),
]


def _weight(out_f, in_f, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.rand(out_f, 1, generator=g)
    return w.to(dtype)


def _oracle_groupwise(weight, bits, group_size):
    """Per-group loop in float64: the textbook definition, written independently of the module."""
    qmax = 127 if bits == 8 else 7
    w = weight.double()
    codes = torch.empty_like(w)
    scales = []
    for start in range(0, w.shape[1], group_size):
        block = w[:, start : start + group_size]
        absmax = block.abs().amax(dim=1, keepdim=True)
        scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
        v = block / scale
        codes[:, start : start + group_size] = torch.sign(v) * torch.floor(v.abs() + 0.5)
        scales.append(scale)
    return codes, torch.cat(scales, dim=1)


def test_int4_pack_roundtrip_and_layout():
    codes = torch.tensor([[-7, 7, 0, -1, 3, -3]], dtype=torch.int8)
    packed = gw.pack_int4(codes)
    # Low nibble holds the even column, each nibble is code + 8.
    assert packed.tolist() == [[(-7 + 8) | ((7 + 8) << 4), 8 | (7 << 4), 11 | (5 << 4)]]
    torch.testing.assert_close(gw.unpack_int4(packed), codes, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_by_hand(bits):
    # absmax of each group is qmax, so scale is 1 and codes are the values rounded half away from 0.
    qmax = 127 if bits == 8 else 7
    first = torch.tensor([qmax, 2.5, -2.5, 1.49, -0.5, 0.4] + [0.0] * 26)
    second = torch.tensor([-qmax * 2.0, 3.0] + [0.0] * 30)  # scale 2: 3.0 / 2 = 1.5 -> 2
    w = torch.cat([first, second])[None, :]
    codes, scales = gw.quantize_groupwise_reference(w, bits=bits, group_size=32)
    ints = codes if bits == 8 else gw.unpack_int4(codes)
    assert ints[0, :6].tolist() == [qmax, 3, -3, 1, -1, 0]
    assert ints[0, 32:34].tolist() == [-qmax, 2]
    torch.testing.assert_close(scales, torch.tensor([[1.0, 2.0]]), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,group_size", WEIGHT_CASES)
def test_quantize_groupwise_triton_matches_reference_and_oracle(bits, dtype, out_f, in_f, group_size, device):
    w = _weight(out_f, in_f, dtype)
    w[0, : min(in_f, group_size)] = 0.0  # an all-zero group: scale 1, codes 0
    codes_ref, scales_ref = gw.quantize_groupwise_reference(w, bits, group_size)
    codes_tri, scales_tri = (t.cpu() for t in gw.quantize_groupwise_triton(w.to(device), bits, group_size))
    torch.testing.assert_close(codes_tri, codes_ref, rtol=0, atol=0)
    torch.testing.assert_close(scales_tri, scales_ref, rtol=0, atol=0)

    oracle_codes, oracle_scales = _oracle_groupwise(w, bits, group_size)
    assert scales_ref.shape == (out_f, -(-in_f // group_size))
    torch.testing.assert_close(scales_ref.double(), oracle_scales, rtol=1e-6, atol=0)
    ints = (codes_ref if bits == 8 else gw.unpack_int4(codes_ref)).double()
    # Float32 vs float64 may tip an exact .5 tie; nothing may move by more than one step.
    assert (ints - oracle_codes).abs().max() <= 1
    assert (ints != oracle_codes).double().mean() < 1e-3
    deq = gw.dequantize_groupwise(codes_ref, scales_ref, bits, group_size, in_f).double()
    step = gw.expand_group_scales(oracle_scales, group_size, in_f)
    assert ((deq - w.double()).abs() <= 0.5 * step * (1 + 1e-5) + 1e-12).all()


def test_quantize_tokenwise_by_hand():
    # absmax 127: the scale is 1 and the codes are the values rounded, ties to even. The codes are
    # LLM.int8()'s, so its rule applies (group-wise weights still round half away from zero).
    x = torch.tensor([[127.0, 2.5, -2.5, 3.5, 1.49, -0.5], [0.0] * 6])
    codes, scale = gw.quantize_tokenwise_step(x)
    assert codes.tolist() == [[127, 2, -2, 4, 1, 0], [0] * 6]
    assert scale[0].item() == 1.0
    assert torch.isfinite(scale[1]) and scale[1] > 0  # all-zero token: codes 0, output = bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,features", [(1, 1), (3, 255), (5, 4097)])
def test_quantize_tokenwise_is_llm_int8_codes_with_step_scale(dtype, tokens, features, device):
    # llm_int8's tests hold its Triton kernel to its reference; here the codes must be its codes
    # and the scale the step absmax / 127 that the group-wise GEMM multiplies by.
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(tokens, features, generator=g) * 3).to(dtype)
    x[-1] = 0.0  # an all-zero token: codes 0 and a finite scale
    codes, scale = (t.cpu() for t in gw.quantize_tokenwise_step(x.to(device)))
    assert torch.equal(codes, llm_int8.quantize_tokenwise_reference(x)[0])
    xf = x.float()
    absmax = xf.abs().amax(1)
    nonzero = absmax > 0
    torch.testing.assert_close(scale[nonzero], absmax[nonzero] / 127, rtol=1e-6, atol=0)
    assert not codes[~nonzero].any() and torch.isfinite(scale).all()
    assert ((codes.float() * scale[:, None] - xf).abs() <= 0.5 * scale[:, None] * (1 + 1e-5)).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act", ["int8", torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,in_f,out_f,group_size", MATMUL_CASES)
def test_groupwise_matmul_triton_matches_reference(bits, act, tokens, in_f, out_f, group_size, device):
    g = torch.Generator().manual_seed(2)
    w = _weight(out_f, in_f, torch.float32, seed=3)
    codes, scales = gw.quantize_groupwise_reference(w, bits, group_size)
    x = torch.randn(tokens, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    if act == "int8":
        x_in, x_scale = gw.quantize_tokenwise_step(x)
        x_deq = x_in.float() * x_scale[:, None]
        out_dtype = torch.float32
    else:
        x_in, x_scale, out_dtype = x.to(act), None, act
        x_deq = x_in.float()
    y_ref = gw.groupwise_matmul_reference(x_in, x_scale, codes, scales, bits, group_size, bias)
    on_device = [None if t is None else t.to(device) for t in (x_in, x_scale, codes, scales, bias)]
    y_tri = gw.groupwise_matmul_triton(*on_device[:4], bits, group_size, on_device[4]).cpu()
    assert y_ref.dtype == y_tri.dtype == out_dtype
    # Independent oracle: dequantize everything and use a float64 linear.
    w_deq = gw.dequantize_groupwise(codes, scales, bits, group_size, in_f).double()
    y_oracle = F.linear(x_deq.double(), w_deq, bias.double())
    tol = dict(rtol=1e-5, atol=1e-4) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=0.1)
    torch.testing.assert_close(y_ref.double(), y_oracle, **tol)
    torch.testing.assert_close(y_tri.double(), y_oracle, **tol)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,in_f,out_f,group_size", MATMUL_CASES)
def test_groupwise_grad_input_triton_matches_autograd(bits, dtype, tokens, in_f, out_f, group_size, device):
    g = torch.Generator().manual_seed(4)
    codes, scales = gw.quantize_groupwise_reference(_weight(out_f, in_f, torch.float32, seed=5), bits, group_size)
    grad_y = torch.randn(tokens, out_f, generator=g).to(dtype)
    w_deq = gw.dequantize_groupwise(codes, scales, bits, group_size, in_f).double()
    x = torch.zeros(tokens, in_f, dtype=torch.float64, requires_grad=True)
    F.linear(x, w_deq).backward(grad_y.double())
    grad_ref = gw.groupwise_matmul_grad_input_reference(grad_y, codes, scales, bits, group_size, in_f)
    grad_tri = gw.groupwise_matmul_grad_input_triton(
        grad_y.to(device), codes.to(device), scales.to(device), bits, group_size, in_f
    ).cpu()
    assert grad_ref.dtype == grad_tri.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=0.05)
    torch.testing.assert_close(grad_ref.double(), x.grad, **tol)
    torch.testing.assert_close(grad_tri.double(), x.grad, **tol)


def test_public_ops_dispatch_to_reference_on_cpu():
    w = _weight(20, 96, torch.float32)
    codes, scales = gw.quantize_groupwise(w, bits=4, group_size=32)
    codes_ref, scales_ref = gw.quantize_groupwise_reference(w, bits=4, group_size=32)
    assert torch.equal(codes, codes_ref) and torch.equal(scales, scales_ref)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(6))
    x_codes, x_scale = gw.quantize_tokenwise_step(x)
    y = gw.groupwise_matmul(x_codes, x_scale, codes, scales, 4, 32)
    torch.testing.assert_close(y, gw.groupwise_matmul_reference(x_codes, x_scale, codes, scales, 4, 32))
    grad = gw.groupwise_matmul_grad_input(y, codes, scales, 4, 32, 96)
    torch.testing.assert_close(grad, gw.groupwise_matmul_grad_input_reference(y, codes, scales, 4, 32, 96))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: gw.quantize_groupwise(torch.randn(4, 64), bits=8, group_size=48), "multiple of 32"),
        (lambda: gw.quantize_groupwise(torch.randn(4, 63), bits=4, group_size=32), "must be even"),
        (lambda: gw.quantize_groupwise(torch.randn(4, 64), bits=3, group_size=32), "bits must be 8 or 4"),
        (lambda: gw.quantize_groupwise(torch.randint(0, 3, (4, 64)), bits=8, group_size=32), "float32/float16"),
        (
            lambda: gw.groupwise_matmul(torch.randn(2, 64), None, torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), 4, 32),
            "uint8",
        ),
        (
            lambda: gw.groupwise_matmul(torch.randn(2, 64), torch.ones(2), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2), 8, 32),
            "int8 codes",
        ),
        (
            lambda: gw.groupwise_matmul(torch.randn(2, 64), None, torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3), 8, 32),
            "scales must be float32",
        ),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("cpu_gemm", ["int_mm", "fp32"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens,in_f,out_f,group_size", [(1, 64, 1, 32), (17, 1090, 9, 1088), (5, 258, 257, 64)])
def test_w8a8_reference_sums_exact_integer_products_per_group(bits, tokens, in_f, out_f, group_size, cpu_gemm, monkeypatch):
    # Each group's integer dot product (test_cpu_int8_gemm holds those to exactness; a 1088-wide
    # group is beyond fp32's exact range) is scaled by that group's scale: float64 per group.
    monkeypatch.setenv("BYTETUNE_CPU_INT8_GEMM", cpu_gemm)
    g = torch.Generator().manual_seed(8)
    codes, scales = gw.quantize_groupwise_reference(_weight(out_f, in_f, torch.float32, seed=9), bits, group_size)
    x_codes = torch.randint(-127, 128, (tokens, in_f), generator=g, dtype=torch.int8)
    x_codes[0] = 127
    x_scale = torch.rand(tokens, generator=g) + 0.01
    ints = (codes if bits == 8 else gw.unpack_int4(codes)).double()
    expected = torch.zeros(tokens, out_f, dtype=torch.float64)
    for start in range(0, in_f, group_size):
        cols = slice(start, start + group_size)
        expected += (x_codes[:, cols].double() @ ints[:, cols].T) * scales[:, start // group_size].double()
    expected *= x_scale.double()[:, None]
    y = gw.groupwise_matmul_reference(x_codes, x_scale, codes, scales, bits, group_size)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("chunk_rows", [1, 3])
@pytest.mark.parametrize("bits", [8, 4])
def test_grad_input_reference_in_row_chunks_matches_float64(bits, chunk_rows, monkeypatch):
    # Chunks of weight rows (the last one short) give the product of the whole weight.
    in_f, out_f, group_size = 200, 10, 64
    monkeypatch.setattr(gw, "_REFERENCE_GRAD_CHUNK_ELEMENTS", chunk_rows * in_f + 7)
    codes, scales = gw.quantize_groupwise_reference(_weight(out_f, in_f, torch.float32, seed=10), bits, group_size)
    grad_y = torch.randn(6, out_f, generator=torch.Generator().manual_seed(11))
    expected = grad_y.double() @ gw.dequantize_groupwise(codes, scales, bits, group_size, in_f).double()
    grad_x = gw.groupwise_matmul_grad_input_reference(grad_y, codes, scales, bits, group_size, in_f)
    torch.testing.assert_close(grad_x.double(), expected, rtol=1e-5, atol=1e-5)


# BLOOM-176B's dense_h_to_4h: 4 * 14336 outputs; at 37,449 tokens its output passes 2^31 elements.
BLOOM_FFN_OUT = 4 * 14336


def test_row_offsets_are_int64_past_2_pow_31(device):
    """The kernels' row * stride offsets at M * N >= 2^31, without allocating 2^31 elements: a
    probe kernel runs the same helper the GEMMs use on the row indices of such a launch."""
    triton = pytest.importorskip("triton")
    tl = triton.language

    @triton.jit
    def probe(rows_ptr, out_ptr, wrapped_ptr, stride, N: tl.constexpr):
        i = tl.arange(0, N)
        rows = tl.load(rows_ptr + i)
        tl.store(out_ptr + i, gw._row_offsets(rows, stride))
        tl.store(wrapped_ptr + i, (rows * stride).to(tl.int64))  # what an int32 product gives

    rows = torch.tensor([0, 1, 37_448, 37_449, 50_000, 2**20, 2**21 - 1, 2**21], dtype=torch.int32, device=device)
    out = torch.empty(rows.numel(), dtype=torch.int64, device=device)  # where the kernel can write
    wrapped = torch.empty_like(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's int32 overflow, in the contrast
        probe[(1,)](rows, out, wrapped, BLOOM_FFN_OUT, N=rows.numel())
    expected = rows.long().cpu() * BLOOM_FFN_OUT
    assert expected.max() >= 2**31  # the case the test exists for
    assert torch.equal(out.cpu(), expected)
    assert not torch.equal(wrapped.cpu(), expected)  # the probe can tell int32 from int64 math


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_layer_kernel_equals_the_composite_of_the_ops(act_bits, bits, dtype):
    """groupwise_linear's CPU kernel calls its parts' references directly (one dispatcher trip):
    it must give exactly what the composite of the public ops gives, NaN and Inf included."""
    gen = torch.Generator().manual_seed(7 + bits + act_bits)
    x = (torch.randn(5, 66, generator=gen) * 3).to(dtype)
    x[1, 3], x[2, 10], x[4, 65] = float("nan"), float("inf"), -float("inf")
    weight = torch.randn(13, 66, generator=gen)  # even: INT4 packs two codes a byte
    codes, scales = gw.quantize_groupwise(weight, bits=bits, group_size=32)
    bias = torch.randn(13, generator=gen).to(dtype)
    expected = gw.groupwise_linear_composite(x, codes, scales, bias, bits, 32, act_bits)
    actual = gw.groupwise_linear_reference(x, codes, scales, bias, bits, 32, act_bits)
    assert actual.dtype == expected.dtype == dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    # the rows holding NaN or Inf are not finite, the others are (nothing leaks between tokens)
    assert not torch.isfinite(actual[[1, 2, 4]]).any() and torch.isfinite(actual[[0, 3]]).all()
