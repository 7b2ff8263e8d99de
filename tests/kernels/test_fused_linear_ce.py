"""Fused linear + cross-entropy: the per-row CE op (Triton under the interpreter against the
PyTorch reference, both against torch's cross_entropy and autograd) and the chunked loss/gradients
against the plain full-logits computation, for float and int8 heads."""

import pytest
import torch
import torch.nn.functional as F

from bytetune.kernels import fused_linear_ce
from bytetune.kernels.dispatch import HAS_TRITON
from bytetune.kernels.fused_linear_ce import (
    CE_GPU_CONFIG,
    cross_entropy_rows_reference,
    cross_entropy_rows_triton,
    default_chunk_tokens,
    fused_linear_cross_entropy,
)
from bytetune.kernels.int8_head import quantize_rowwise

from ..conftest import triton_device
from ..quant_layers.conftest import no_host_sync

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
VOCABS = [1, 255, 257, 4097]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rows(n, vocab, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    return logits, targets


def _torch_loss_and_grad(logits, targets):
    as_float = logits.float().requires_grad_()
    loss = F.cross_entropy(as_float, targets, reduction="none")
    loss.sum().backward()
    return loss.detach(), as_float.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", VOCABS)
def test_reference_rows_equal_torch_cross_entropy_and_its_gradient(vocab, dtype):
    logits, targets = _rows(6, vocab, dtype, seed=vocab)
    expected_loss, expected_grad = _torch_loss_and_grad(logits, targets)
    buffer = logits.clone()
    loss = cross_entropy_rows_reference(buffer, targets)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer.float(), expected_grad.to(dtype).float(), rtol=RTOL[dtype], atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", VOCABS)
def test_triton_rows_match_the_reference(vocab, dtype, device):
    logits, targets = _rows(3, vocab, dtype, seed=vocab + 1)
    expected = logits.clone()
    expected_loss = cross_entropy_rows_reference(expected, targets)
    buffer = logits.to(device)
    loss = cross_entropy_rows_triton(buffer, targets.to(device))
    torch.testing.assert_close(loss.cpu(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer.cpu().float(), expected.float(), rtol=RTOL[dtype], atol=1e-6)


def _plain(hidden, targets, weight):
    logits = hidden.float() @ weight.float().t()
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


def _problem(n, h, vocab, seed=0, ignored_every=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) * 0.2
    targets = torch.randint(0, vocab, (n,), generator=g)
    if ignored_every:
        targets[::ignored_every] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 7, None, 1000])
@pytest.mark.parametrize("n,vocab", [(1, 257), (45, 255), (60, 4097)])
def test_fused_loss_and_gradients_equal_the_full_logits_path(n, vocab, chunk):
    hidden, weight, targets = _problem(n, 33, vocab, seed=n, ignored_every=4 if n > 1 else None)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = fused_linear_cross_entropy(h1, targets, weight=w1, chunk_tokens=chunk)
    plain = _plain(h2, targets, w2)
    (fused * 0.5).backward()  # an upstream factor must reach both gradients
    (plain * 0.5).backward()
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    if n > 1:
        assert (h1.grad[::4] == 0).all()  # ignored rows get no gradient


@pytest.mark.parametrize("chunk", [5, None])
def test_int8_head_equals_the_plain_path_on_its_dequantized_weight(chunk):
    hidden, weight, targets = _problem(50, 40, 1001, seed=5, ignored_every=3)
    w_int8, w_scale = quantize_rowwise(weight)
    dequantized = w_int8.float() * (w_scale / 127.0)[:, None]
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    fused = fused_linear_cross_entropy(h1, targets, w_int8=w_int8, w_scale=w_scale, chunk_tokens=chunk)
    plain = _plain(h2, targets, dequantized)
    fused.backward()
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("head", ["int8", "float"])
def test_fused_loss_through_the_triton_kernels_never_waits_for_the_device(monkeypatch, head):
    """The GPU route (BYTETUNE_FORCE_TRITON: CPU tensors under the interpreter, CUDA ones when
    Triton compiles) equals the CPU route, and reads nothing back from the device: ignored rows
    are masked, not dropped (the CPU route drops them, as its check is free there)."""
    hidden, weight, targets = _problem(20, 24, 300, seed=9, ignored_every=5)
    w_int8, w_scale = quantize_rowwise(weight)
    h_cpu, w_cpu = hidden.clone().requires_grad_(), weight.clone().requires_grad_(head == "float")
    heads = dict(weight=w_cpu) if head == "float" else dict(w_int8=w_int8, w_scale=w_scale)
    reference = fused_linear_cross_entropy(h_cpu, targets, chunk_tokens=6, **heads)
    reference.backward()
    monkeypatch.setenv("BYTETUNE_FORCE_TRITON", "1")
    device = triton_device()
    h = hidden.to(device).requires_grad_()
    w = weight.to(device).requires_grad_(head == "float")
    heads = dict(weight=w) if head == "float" else dict(w_int8=w_int8.to(device), w_scale=w_scale.to(device))
    with no_host_sync():
        forced = fused_linear_cross_entropy(h, targets.to(device), chunk_tokens=6, **heads)
        forced.backward()
    torch.testing.assert_close(forced.cpu(), reference, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.cpu(), h_cpu.grad, rtol=1e-4, atol=1e-6)
    assert (h.grad[::5] == 0).all()
    if head == "float":
        torch.testing.assert_close(w.grad.cpu(), w_cpu.grad, rtol=1e-4, atol=1e-6)


@needs_triton
def test_rows_with_negative_or_out_of_range_targets(device):
    """A negative target: an ignored row (loss 0, gradient 0); one >= V: NaN, the GPU route's
    error signal (raising would make the host wait). Kernel and reference agree."""
    logits, targets = _rows(5, 37, torch.float32, seed=4)
    targets[1], targets[3] = -1, 37
    expected = logits.clone()
    expected_loss = cross_entropy_rows_reference(expected, targets)
    assert expected_loss[1] == 0 and (expected[1] == 0).all()
    assert torch.isnan(expected_loss[3]) and torch.isnan(expected[3]).all()
    valid = torch.tensor([0, 2, 4])
    torch_loss, torch_grad = _torch_loss_and_grad(logits[valid], targets[valid])
    torch.testing.assert_close(expected_loss[valid], torch_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected[valid], torch_grad, rtol=1e-5, atol=1e-6)
    buffer = logits.to(device)
    loss = cross_entropy_rows_triton(buffer, targets.to(device))
    torch.testing.assert_close(loss.cpu(), expected_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(buffer.cpu(), expected, rtol=1e-5, atol=1e-6, equal_nan=True)


@needs_triton
def test_gpu_route_turns_a_bad_target_into_a_nan_loss_and_all_ignored_into_zero(monkeypatch):
    hidden, weight, targets = _problem(6, 8, 20, seed=3)
    with pytest.raises(ValueError, match="targets must be in"):  # the CPU route raises
        fused_linear_cross_entropy(hidden, targets + 20, weight=weight)
    monkeypatch.setenv("BYTETUNE_FORCE_TRITON", "1")
    device = triton_device()
    hidden, weight, targets = hidden.to(device), weight.to(device), targets.to(device)
    bad = targets.clone()
    bad[2] = -7  # neither a token nor the ignore index
    assert torch.isnan(fused_linear_cross_entropy(hidden, bad, weight=weight))
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, torch.full_like(targets, -100), weight=weight)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all()


def test_bf16_autocast_runs_the_head_in_bf16_like_nn_linear():
    hidden, weight, targets = _problem(30, 32, 500, seed=2)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_cross_entropy(h1, targets, weight=weight)
        logits = F.linear(h2, weight)  # what the model's head would give
    assert logits.dtype == torch.bfloat16
    plain = F.cross_entropy(logits.float(), targets, reduction="sum")
    fused.backward()
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=3e-2, atol=3e-3)


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_computes_the_loss_only():
    hidden, weight, targets = _problem(12, 16, 70, seed=4)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, targets, weight=weight)
    loss.backward()
    assert weight.grad is None and h.grad is not None
    with torch.no_grad():
        again = fused_linear_cross_entropy(hidden, targets, weight=weight)
    torch.testing.assert_close(again, loss.detach())


def test_all_targets_ignored_gives_zero_and_zero_gradient():
    hidden, weight, targets = _problem(5, 8, 20)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, torch.full_like(targets, -100), weight=weight)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all()


def test_logits_of_a_chunk_are_never_the_whole_vocab_times_tokens(monkeypatch):
    hidden, weight, targets = _problem(64, 16, 2000, seed=1)
    shapes = []
    real = fused_linear_ce.cross_entropy_rows
    monkeypatch.setattr(fused_linear_ce, "cross_entropy_rows", lambda l, t: shapes.append(l.shape) or real(l, t))
    fused_linear_cross_entropy(hidden.requires_grad_(), targets, weight=weight, chunk_tokens=10)
    assert [s[0] for s in shapes] == [10] * 6 + [4]


def test_default_chunk_keeps_a_chunk_of_logits_near_the_hidden_states_size():
    assert default_chunk_tokens(2048, 576, 49152) == 32  # 86 chunks of <= 32 tokens (the floor)
    assert default_chunk_tokens(16384, 4096, 128256) == 512
    assert default_chunk_tokens(5, 64, 250880) == 5  # never more than the tokens there are
    # A CPU's BLAS wants more rows per GEMM: a higher floor there, the same rule above it.
    assert default_chunk_tokens(2048, 576, 49152, on_cpu=True) == 128
    assert default_chunk_tokens(16384, 4096, 128256, on_cpu=True) == 512
    assert default_chunk_tokens(100, 576, 49152, on_cpu=True) == 100
    assert CE_GPU_CONFIG["BLOCK_V"] & (CE_GPU_CONFIG["BLOCK_V"] - 1) == 0


def test_bad_inputs_name_the_problem():
    hidden, weight, targets = _problem(4, 8, 10)
    with pytest.raises(ValueError, match="exactly one head"):
        fused_linear_cross_entropy(hidden, targets)
    with pytest.raises(ValueError, match=r"hidden must be \[tokens, 8\]"):
        fused_linear_cross_entropy(hidden[:, :5], targets, weight=weight)
    with pytest.raises(ValueError, match="targets must be in"):
        fused_linear_cross_entropy(hidden, targets + 100, weight=weight)
