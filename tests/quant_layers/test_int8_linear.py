import pytest
import torch
from torch import nn

from bytetune import Int8Linear
from bytetune.kernels import llm_int8
from bytetune.quant_layers import int8_linear as int8_linear_module

N_OUTLIERS = 4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def dequantized(layer: Int8Linear) -> torch.Tensor:
    """The weight the int8 codes stand for, written out here from the convention (absmax / 127)."""
    return layer.weight.float() * layer.weight_scale[:, None] / 127.0


def planted_outlier_input(batch: int, features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, features, generator=generator)
    cols = torch.randperm(features, generator=generator)[:N_OUTLIERS]
    sign = torch.randint(0, 2, (batch, N_OUTLIERS), generator=generator) * 2 - 1
    x[:, cols] = sign * 20.0 * (1 + 0.1 * torch.randn(batch, N_OUTLIERS, generator=generator))
    return x, cols


@pytest.fixture
def layer_1024():
    torch.manual_seed(0)
    return nn.Linear(1024, 1024)


def test_outlier_decomposition_accuracy(layer_1024, device):
    layer_1024 = layer_1024.to(device)
    x, _ = planted_outlier_input(256, 1024, torch.Generator().manual_seed(1))
    x = x.to(device)
    expected = layer_1024(x).detach()
    error_t6 = relative_error(Int8Linear.from_linear(layer_1024, threshold=6.0)(x).detach(), expected)
    error_t0 = relative_error(Int8Linear.from_linear(layer_1024, threshold=0.0)(x).detach(), expected)
    assert error_t6 <= 7e-3, error_t6
    assert error_t0 >= 4 * error_t6, (error_t0, error_t6)


def test_accuracy_without_outliers(layer_1024, device):
    layer_1024 = layer_1024.to(device)
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2)).to(device)
    expected = layer_1024(x).detach()
    for threshold in (6.0, 0.0):
        error = relative_error(Int8Linear.from_linear(layer_1024, threshold=threshold)(x).detach(), expected)
        assert error <= 1e-2, (threshold, error)


def test_quantized_weight_is_rowwise_absmax(layer_1024):
    layer = Int8Linear.from_linear(layer_1024)
    weight = layer_1024.weight.detach()
    torch.testing.assert_close(layer.weight_scale, weight.abs().amax(dim=1))
    # Rounding to the nearest code: at most half a step (absmax / 254) off per element.
    step = weight.abs().amax(dim=1, keepdim=True) / 127.0
    assert ((dequantized(layer) - weight).abs() <= step / 2 + 1e-7).all()
    assert (layer.weight.abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_input_gradient_is_grad_y_times_dequantized_weight(layer_1024, threshold, device):
    layer = Int8Linear.from_linear(layer_1024.to(device), threshold=threshold)
    x, _ = planted_outlier_input(256, 1024, torch.Generator().manual_seed(3))
    x = x.to(device).requires_grad_(True)
    grad_y = torch.randn(256, 1024, generator=torch.Generator().manual_seed(4)).to(device)
    layer(x).backward(grad_y)
    expected = grad_y.double() @ dequantized(layer).double()
    assert relative_error(x.grad, expected) <= 1e-5
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_bias_gradient_when_bias_is_unfrozen(kernel_path):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(33, 17))
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 33)
    grad_y = torch.randn(5, 17)
    layer(x).backward(grad_y)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum(0))


@pytest.mark.parametrize(
    "dtype, tolerance",
    [(torch.float32, 1e-2), (torch.bfloat16, 3e-2), (torch.float16, 1.5e-2)],
)
@pytest.mark.parametrize("leading", [(7,), (2, 3), (2, 1, 5)])
def test_activation_dtypes_and_leading_dims(dtype, tolerance, leading, device):
    torch.manual_seed(0)
    linear = nn.Linear(257, 129).to(device)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(*leading, 257, device=device)
    x[..., 5] = 9.0  # one outlier column, so the 16-bit path runs in every dtype
    x_low = x.to(dtype).requires_grad_(True)
    y = layer(x_low)
    assert y.dtype == dtype and y.shape == (*leading, 129)
    assert relative_error(y.detach(), linear(x.to(dtype).float()).detach()) <= tolerance
    y.float().sum().backward()
    assert x_low.grad.dtype == dtype and x_low.grad.shape == x_low.shape
    expected_grad = torch.ones(*leading, 129, device=device) @ dequantized(layer)
    assert relative_error(x_low.grad, expected_grad) <= tolerance


def test_from_conv1d_matches_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 80)  # 80 inputs -> 48 outputs, weight stored [80, 48]
    nn.init.normal_(conv.bias)
    layer = Int8Linear.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (80, 48)
    x = torch.randn(3, 11, 80)
    assert relative_error(layer(x).detach(), conv(x).detach()) <= 1e-2


def test_state_dict_round_trip_does_not_requantize(layer_1024, monkeypatch):
    layer = Int8Linear.from_linear(layer_1024, threshold=6.0)
    state = layer.state_dict()
    assert set(state) == {"weight", "weight_scale", "bias"}
    assert state["weight"].dtype == torch.int8 and state["weight_scale"].dtype == torch.float32

    def refuse(*args, **kwargs):
        raise AssertionError("loading a state dict must not quantize again")

    monkeypatch.setattr(int8_linear_module, "quantize_rowwise", refuse)
    fresh = Int8Linear(1024, 1024, threshold=6.0)
    fresh.load_state_dict(state)
    x, _ = planted_outlier_input(8, 1024, torch.Generator().manual_seed(5))
    assert torch.equal(fresh(x), layer(x))


def test_loading_a_float_weight_is_refused():
    layer = Int8Linear(16, 8)
    state = {"weight": torch.randn(8, 16), "weight_scale": torch.ones(8), "bias": torch.zeros(8)}
    with pytest.raises(RuntimeError, match="from_linear"):
        layer.load_state_dict(state)


def test_weight_memory_is_one_byte_per_parameter(layer_1024):
    layer = Int8Linear.from_linear(layer_1024)
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    scale_bytes = layer.weight_scale.numel() * layer.weight_scale.element_size()
    assert weight_bytes == layer.weight.numel()
    assert (weight_bytes + scale_bytes) / layer.weight.numel() <= 1.01


def test_is_an_nn_linear_for_peft():
    assert isinstance(Int8Linear(4, 4), nn.Linear)


def test_bad_inputs_name_the_problem():
    layer = Int8Linear.from_linear(nn.Linear(8, 4))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        layer(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="last dim 8"):
        layer(torch.randn(2, 9))
    with pytest.raises(TypeError, match="already an Int8Linear"):
        Int8Linear.from_linear(layer)


def test_dtype_casts_keep_float32_scales():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(40, 24))
    scale = layer.weight_scale.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(layer)
        assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
        assert layer.weight.dtype == torch.int8
    assert layer.bias.dtype == torch.float32
    assert layer(torch.randn(3, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------
# Against LLM.int8() composed from the kernel references (outlier_columns: the data-dependent
# set), on both kernel paths, with strided inputs and the outlier capacity's contract
# ------------------------------------------------------------------------------------------

OUTPUT_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def llm_int8_reference(x2d, layer, outlier_cols):
    """LLM.int8()'s forward written with the kernels' reference functions and an explicit set of
    outlier columns."""
    x_codes, x_scale = llm_int8.quantize_tokenwise_reference(x2d, outlier_cols)
    bias = None if layer.bias is None else layer.bias.to(x2d.dtype)
    y = llm_int8.int8_matmul_reference(x_codes, layer.weight, x_scale, layer.weight_scale, bias, x2d.dtype)
    w_outlier = dequantized(layer)[:, outlier_cols].to(x2d.dtype)
    return y + x2d[:, outlier_cols] @ w_outlier.t()


def strided_outlier_input(tokens, features, dtype, layout, generator):
    x, _ = planted_outlier_input(tokens, features, generator)
    x = x.to(dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "every_other_column":
        wide = torch.zeros(tokens, 2 * features, dtype=dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    assert x.is_contiguous() == (layout == "contiguous")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "every_other_column"])
def test_matches_llm_int8_reference(kernel_path, dtype, layout):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(100, 37), threshold=6.0)
    x = strided_outlier_input(19, 100, dtype, layout, torch.Generator().manual_seed(8)).requires_grad_(True)
    y = layer(x)
    outlier_cols = llm_int8.outlier_columns_reference(x.detach(), 6.0)
    assert outlier_cols.numel() == N_OUTLIERS
    expected = llm_int8_reference(x.detach(), layer, outlier_cols)
    assert y.dtype == dtype
    torch.testing.assert_close(y.detach(), expected, **OUTPUT_TOLERANCE[dtype])
    grad_y = torch.randn(19, 37, generator=torch.Generator().manual_seed(9)).to(dtype)
    y.backward(grad_y)
    expected_grad = llm_int8.int8_matmul_grad_input_reference(grad_y, layer.weight, layer.weight_scale)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, expected_grad, **OUTPUT_TOLERANCE[dtype])


def overflowing_input(tokens, generator):
    """64 features, 6 of them outliers of distinct magnitudes 8, 10, ..., 18."""
    x = torch.randn(tokens, 64, generator=generator).clamp(-3, 3)
    cols = torch.randperm(64, generator=generator)[:6]
    for rank, col in enumerate(cols.tolist()):
        x[rank % tokens, col] = -(8.0 + 2 * rank) if rank % 2 else 8.0 + 2 * rank
    return x, cols


@pytest.mark.parametrize("capacity", [6, 64, 1000])
def test_outlier_capacity_at_or_above_the_count_is_exact_llm_int8(kernel_path, capacity):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 16), threshold=6.0, outlier_capacity=capacity)
    x, cols = overflowing_input(9, torch.Generator().manual_seed(10))
    expected = llm_int8_reference(x, layer, cols.sort().values)
    torch.testing.assert_close(layer(x).detach(), expected, **OUTPUT_TOLERANCE[torch.float32])


@pytest.mark.parametrize("capacity", [0, 1, 4])
def test_outlier_capacity_overflow_keeps_the_largest_columns(kernel_path, capacity):
    """More columns than the capacity reach the threshold: the `capacity` columns of largest
    absmax take the 16-bit path, the others stay in the int8 part -- LLM.int8() with the
    threshold raised to the capacity-th largest column absmax."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 16), threshold=6.0, outlier_capacity=capacity)
    x, cols = overflowing_input(9, torch.Generator().manual_seed(10))
    largest = cols[6 - capacity :]  # planted with increasing magnitude
    expected = llm_int8_reference(x, layer, largest.sort().values)
    torch.testing.assert_close(layer(x).detach(), expected, **OUTPUT_TOLERANCE[torch.float32])
    all_outliers = llm_int8_reference(x, layer, cols.sort().values)
    assert not torch.allclose(layer(x), all_outliers, rtol=1e-3, atol=1e-3)


def test_default_outlier_capacity():
    assert Int8Linear(100, 8).outlier_capacity == 64
    assert Int8Linear(40, 8).outlier_capacity == 40
    assert Int8Linear(4096, 8).outlier_capacity == 128
    with pytest.raises(ValueError, match="outlier_capacity must be >= 0"):
        Int8Linear(8, 8, outlier_capacity=-1)


# ------------------------------------------------------------------------------------------
# torch.autocast
# ------------------------------------------------------------------------------------------


def test_autocast_bf16_computes_in_bf16(kernel_path, monkeypatch):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(100, 37), threshold=6.0)
    grad_input_dtypes = []
    # The kernel the CPU backend runs on this path (it looks the name up at each call).
    kernel_name = f"int8_matmul_grad_input_{kernel_path}"
    grad_input = getattr(llm_int8, kernel_name)

    def recording_grad_input(grad_y, w_int8, w_scale):
        grad_input_dtypes.append(grad_y.dtype)
        return grad_input(grad_y, w_int8, w_scale)

    monkeypatch.setattr(llm_int8, kernel_name, recording_grad_input)
    x, _ = planted_outlier_input(19, 100, torch.Generator().manual_seed(11))
    x.requires_grad_(True)
    grad_y = torch.randn(19, 37, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(grad_y)
    # The grad-input kernel took the 16-bit path; the cast back to the fp32 input is autograd's.
    assert grad_input_dtypes == [torch.bfloat16]
    assert x.grad.dtype == torch.float32

    # Exactly what the layer computes on a bf16 input, forward and backward.
    x_bf16 = x.detach().to(torch.bfloat16).requires_grad_(True)
    y_bf16 = layer(x_bf16)
    y_bf16.backward(grad_y)
    assert torch.equal(y.detach(), y_bf16.detach())
    assert torch.equal(x.grad, x_bf16.grad.float())
    # And close to the float math on the dequantized weight.
    expected = x.detach().double() @ dequantized(layer).double().t() + layer.bias.double()
    assert relative_error(y.detach(), expected) <= 1e-2
    assert relative_error(x.grad, grad_y.double() @ dequantized(layer).double()) <= 1e-2


def test_autocast_disabled_keeps_the_input_dtype():
    layer = Int8Linear.from_linear(nn.Linear(16, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert layer(torch.randn(3, 16)).dtype == torch.float32
