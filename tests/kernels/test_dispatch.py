"""CUDA tensors reach the Triton kernels: checked without a GPU on fake CUDA tensors.

FakeTensorMode makes tensors whose device is ``cuda:0`` (``is_cuda`` is True) and that only carry
shapes and dtypes. Every Triton entry point is replaced by a recorder that returns empty outputs
of the right shapes, and every reference by a function that fails: a public op (or a layer op's
body) that sent a CUDA tensor to the reference fails.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bytetune.kernels import groupwise, llm_int8, ops
from bytetune.kernels.dispatch import HAS_TRITON, use_triton

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="dispatch picks Triton only when triton is installed")



def _codes_and_scales(rows, cols, scales_shape, like, codes_dtype=torch.int8):
    return like.new_empty(rows, cols, dtype=codes_dtype), like.new_empty(scales_shape, dtype=torch.float32)


# (module, op, the Triton kernel's outputs: empty tensors of its shapes and dtypes)
OPS = [
    (llm_int8, "quantize_rowwise", lambda w: _codes_and_scales(*w.shape, w.shape[0], w)),
    (llm_int8, "column_absmax", lambda x: x.new_empty(x.shape[1], dtype=torch.float32)),
    (llm_int8, "quantize_tokenwise", lambda x, cols=None: _codes_and_scales(*x.shape, x.shape[0], x)),
    (
        llm_int8,
        "int8_matmul",
        lambda x, w, xs, ws, bias=None, out_dtype=torch.float32: x.new_empty(x.shape[0], w.shape[0], dtype=out_dtype),
    ),
    (llm_int8, "int8_matmul_grad_input", lambda g, w, s: g.new_empty(g.shape[0], w.shape[1])),
    (
        groupwise,
        "quantize_groupwise",
        lambda w, bits, gs: _codes_and_scales(
            w.shape[0], w.shape[1] * bits // 8, (w.shape[0], -(-w.shape[1] // gs)), w, torch.uint8 if bits == 4 else torch.int8
        ),
    ),
    (
        groupwise,
        "groupwise_matmul",
        lambda x, xs, codes, scales, bits, gs, bias=None, out_dtype=None: x.new_empty(
            x.shape[0], codes.shape[0], dtype=out_dtype or (x.dtype if xs is None else torch.float32)
        ),
    ),
    (groupwise, "groupwise_matmul_grad_input", lambda g, codes, scales, bits, gs, k: g.new_empty(g.shape[0], k)),
]


@pytest.fixture
def triton_calls(monkeypatch):
    monkeypatch.delenv("BYTETUNE_FORCE_TRITON", raising=False)
    calls = []
    for module, op, outputs in OPS:

        def recorder(*args, _op=op, _outputs=outputs, **kwargs):
            assert all(a.is_cuda for a in args if isinstance(a, torch.Tensor))
            calls.append(_op)
            return _outputs(*args, **kwargs)

        def refuse(*args, _op=op, **kwargs):
            raise AssertionError(f"{_op}: a CUDA tensor was sent to the PyTorch reference")

        monkeypatch.setattr(module, f"{op}_triton", recorder)
        monkeypatch.setattr(module, f"{op}_reference", refuse)
    return calls


def test_use_triton_is_true_for_cuda_tensors_only(monkeypatch):
    monkeypatch.delenv("BYTETUNE_FORCE_TRITON", raising=False)
    with FakeTensorMode():
        assert use_triton(torch.empty(2, 3, device="cuda"))
        assert not use_triton(torch.empty(2, 3, device="cpu"))
    assert not use_triton(torch.empty(2, 3, device="meta"))


def test_public_ops_send_cuda_tensors_to_triton(triton_calls):
    with FakeTensorMode():
        x = torch.empty(5, 64, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(24, 64, device="cuda", dtype=torch.bfloat16)
        w_int8, w_scale = llm_int8.quantize_rowwise(w)
        llm_int8.column_absmax(x)
        x_int8, x_scale = llm_int8.quantize_tokenwise(x, torch.zeros(64, dtype=torch.bool, device="cuda"))
        y = llm_int8.int8_matmul(x_int8, w_int8, x_scale, w_scale, out_dtype=torch.bfloat16)
        llm_int8.int8_matmul_grad_input(y, w_int8, w_scale)
        codes, scales = groupwise.quantize_groupwise(w, bits=4, group_size=32)
        y = groupwise.groupwise_matmul(x, None, codes, scales, 4, 32)
        groupwise.groupwise_matmul_grad_input(y, codes, scales, 4, 32, 64)
    assert triton_calls == [op for _, op, _ in OPS]


@pytest.mark.parametrize("act_bits", [8, 16])
def test_layer_op_bodies_send_cuda_tensors_to_triton(triton_calls, act_bits):
    with FakeTensorMode():
        x = torch.empty(5, 64, device="cuda", dtype=torch.bfloat16)
        grad_y = torch.empty(5, 24, device="cuda", dtype=torch.bfloat16)
        w_int8 = torch.empty(24, 64, device="cuda", dtype=torch.int8)
        w_scale = torch.empty(24, device="cuda")
        ops.IMPLEMENTATIONS["bytetune::int8_linear"](x, w_int8, w_scale, None, 6.0, 16)
        ops.IMPLEMENTATIONS["bytetune::int8_matmul_grad_input"](grad_y, w_int8, w_scale)
        codes = torch.empty(24, 32, device="cuda", dtype=torch.uint8)
        scales = torch.empty(24, 2, device="cuda")
        ops.IMPLEMENTATIONS["bytetune::groupwise_linear"](x, codes, scales, None, 4, 32, act_bits)
        ops.IMPLEMENTATIONS["bytetune::groupwise_matmul_grad_input"](grad_y, codes, scales, 4, 32, 64)
    tokenwise = ["quantize_tokenwise"] if act_bits == 8 else []
    assert triton_calls == [
        "column_absmax",
        "quantize_tokenwise",
        "int8_matmul",
        "int8_matmul_grad_input",
        *tokenwise,
        "groupwise_matmul",
        "groupwise_matmul_grad_input",
    ]
