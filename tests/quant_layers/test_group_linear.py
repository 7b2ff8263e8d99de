"""GroupQuantLinear: forward and input gradient against float math on the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bytetune.kernels import groupwise
from bytetune.quant_layers.group_linear import GroupQuantLinear


def _linear(in_f, out_f, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _fake_quant_tokens(x):
    """Token-wise int8 round trip, written independently: absmax / 127 per row, round half to even
    (the layer quantizes tokens with llm_int8's kernel, whose rule that is)."""
    xf = x.float()
    absmax = xf.abs().amax(-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    return torch.round(xf / scale) * scale


def _strided(t, layout):
    """The same values as a non-contiguous tensor: column-major, or every other column of a wider one."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "every_other_column":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f,group_size", [(64, 24, 32), (200, 33, 64)])
def test_forward_matches_dequantized_float(bits, act_bits, dtype, in_f, out_f, group_size, kernel_path):
    linear = _linear(in_f, out_f)
    layer = GroupQuantLinear.from_linear(linear, bits=bits, group_size=group_size, act_bits=act_bits)
    x = torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)
    assert y.shape == (2, 5, out_f) and y.dtype == dtype
    x_eff = _fake_quant_tokens(x) if act_bits == 8 else x.float()
    expected = F.linear(x_eff.double(), layer.dequantized_weight().double(), linear.bias.double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), expected, **tol)


@pytest.mark.parametrize("bits,max_rel_err", [(8, 0.01), (4, 0.2)])
def test_quantization_error_is_small(bits, max_rel_err):
    linear = _linear(256, 64)
    layer = GroupQuantLinear.from_linear(linear, bits=bits, group_size=64, act_bits=16)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = linear(x)
        rel = (layer(x) - ref).norm() / ref.norm()
    assert rel < max_rel_err
    assert rel > 0  # the weight really is quantized


def test_smaller_groups_are_more_accurate():
    linear = _linear(256, 64)
    w = linear.weight.detach()
    errs = [
        (GroupQuantLinear.from_linear(linear, bits=4, group_size=g).dequantized_weight() - w).norm()
        for g in (256, 64, 32)
    ]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "every_other_column"])
def test_backward_input_and_bias_grad(bits, act_bits, layout, kernel_path):
    linear = _linear(96, 40)
    layer = GroupQuantLinear.from_linear(linear, bits=bits, group_size=32, act_bits=act_bits)
    layer.bias.requires_grad_(True)
    x = _strided(torch.randn(21, 96, generator=torch.Generator().manual_seed(3)), layout)
    x = x.requires_grad_(True)
    grad_y = _strided(torch.randn(21, 40, generator=torch.Generator().manual_seed(4)), layout)
    y = layer(x)
    x_eff = _fake_quant_tokens(x.detach()) if act_bits == 8 else x.detach()
    expected = F.linear(x_eff.double(), layer.dequantized_weight().double(), linear.bias.double())
    torch.testing.assert_close(y.detach().double(), expected, rtol=1e-4, atol=1e-4)
    y.backward(grad_y)
    w_deq = layer.dequantized_weight()
    torch.testing.assert_close(x.grad, grad_y @ w_deq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum(0), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_storage_bytes_and_dtypes():
    int4 = GroupQuantLinear.from_linear(_linear(256, 64, bias=False), bits=4, group_size=128)
    int8 = GroupQuantLinear.from_linear(_linear(256, 64, bias=False), bits=8, group_size=128)
    assert int4.weight.dtype == torch.uint8 and int4.weight.shape == (64, 128)
    assert int8.weight.dtype == torch.int8 and int8.weight.shape == (64, 256)
    assert int4.weight_scale.shape == int8.weight_scale.shape == (64, 2)
    int4_bytes = sum(t.numel() * t.element_size() for t in int4.state_dict().values())
    assert int4_bytes == 64 * 256 // 2 + 64 * 2 * 4  # codes + float32 scales


@pytest.mark.parametrize("bits", [8, 4])
def test_dtype_casts_keep_float32_scales(bits):
    # model.to(torch.bfloat16) must not round the scales: the GEMMs take float32 scales only.
    layer = GroupQuantLinear.from_linear(_linear(64, 16), bits=bits, group_size=32)
    scale, codes = layer.weight_scale.clone(), layer.weight.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert torch.equal(layer.weight, codes) and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_ragged_last_group():
    linear = _linear(80, 8)  # groups of 32: 32 + 32 + 16
    layer = GroupQuantLinear.from_linear(linear, bits=4, group_size=32)
    assert layer.weight_scale.shape == (8, 3)
    # The short group's scale comes from its own 16 columns only.
    torch.testing.assert_close(layer.weight_scale[:, 2], linear.weight.detach()[:, 64:].abs().amax(1) / 7)


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_roundtrip_and_float_weight_rejected(bits):
    layer = GroupQuantLinear.from_linear(_linear(64, 16), bits=bits, group_size=32)
    fresh = GroupQuantLinear(64, 16, bits=bits, group_size=32)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="from_linear"):
        fresh.load_state_dict(_linear(64, 16).state_dict())


def test_set_quantized_stores_codes_and_scales():
    layer = GroupQuantLinear(64, 2, bias=False, bits=4, group_size=32)
    codes = torch.randint(-7, 8, (2, 64), generator=torch.Generator().manual_seed(6))
    scales = torch.rand(2, 2, generator=torch.Generator().manual_seed(7)) + 0.1
    layer.set_quantized(codes, scales)
    expected = codes.float() * scales.repeat_interleave(32, dim=1)
    torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[-7, 7\]"):
        layer.set_quantized(codes * 2, scales)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=3), "bits must be 8 or 4"),
        (dict(act_bits=4), "act_bits must be 8"),
        (dict(bits=4, in_features=33), "must be even"),
    ],
)
def test_bad_config_errors(kwargs, match):
    args = dict(in_features=32, out_features=4) | kwargs
    with pytest.raises(ValueError, match=match):
        GroupQuantLinear(**args)


def test_bad_input_errors():
    layer = GroupQuantLinear.from_linear(_linear(32, 4), bits=8, group_size=32)
    with pytest.raises(ValueError, match="last dim 32"):
        layer(torch.randn(2, 31))
    with pytest.raises(TypeError, match="activations"):
        layer(torch.ones(2, 32, dtype=torch.int32))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act_bits", [8, 16])
def test_autocast_bf16_computes_in_bf16(bits, act_bits, kernel_path, monkeypatch):
    linear = _linear(96, 40)
    layer = GroupQuantLinear.from_linear(linear, bits=bits, group_size=32, act_bits=act_bits)
    grad_input_dtypes = []
    # The kernel the CPU backend runs on this path (it looks the name up at each call).
    kernel_name = f"groupwise_matmul_grad_input_{kernel_path}"
    grad_input = getattr(groupwise, kernel_name)

    def recording_grad_input(grad_y, *args):
        grad_input_dtypes.append(grad_y.dtype)
        return grad_input(grad_y, *args)

    monkeypatch.setattr(groupwise, kernel_name, recording_grad_input)
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(5), requires_grad=True)
    grad_y = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(grad_y)
    assert grad_input_dtypes == [torch.bfloat16] and x.grad.dtype == torch.float32

    # Exactly the layer on a bf16 input, forward and backward...
    x_bf16 = x.detach().to(torch.bfloat16).requires_grad_(True)
    y_bf16 = layer(x_bf16)
    y_bf16.backward(grad_y)
    assert torch.equal(y.detach(), y_bf16.detach()) and torch.equal(x.grad, x_bf16.grad.float())
    # ...and close to the float math on the dequantized weight (bf16 input and output rounding).
    x_eff = _fake_quant_tokens(x_bf16.detach()) if act_bits == 8 else x_bf16.detach().float()
    expected = F.linear(x_eff.double(), layer.dequantized_weight().double(), linear.bias.double())
    torch.testing.assert_close(y.detach().double(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(
        x.grad.double(), grad_y.double() @ layer.dequantized_weight().double(), rtol=2e-2, atol=2e-2
    )
