"""Each op is declared once and has a kernel per device: CUDA tensors reach the Triton launchers,
CPU tensors the references (or the launchers under BYTETUNE_FORCE_TRITON). Checked without a GPU.

FakeTensorMode makes tensors whose device is ``cuda:0`` and that only carry shapes and dtypes.
Under it the dispatcher would run an op's fake, so a dispatch mode (:class:`RunCudaKernels`)
steps into the CUDA kernel registered for each ``bytetune::`` op instead. Every Triton launcher
is replaced by a recorder that returns empty outputs of the right shapes, and every reference by
a function that fails: a CUDA kernel that sent a CUDA tensor to the reference fails.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from bytetune.kernels import _ops, backends, groupwise, llm_int8
from bytetune.kernels.dispatch import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the CUDA kernels are the Triton launchers only when triton is installed")


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


class RunCudaKernels(TorchDispatchMode):
    """Runs each ``bytetune::`` op's registered CUDA kernel (with the mode still active, so the
    ops inside a composite kernel are stepped into too); every other op runs as it is."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "bytetune":
            with self:
                return backends.implementation(func._schema.name, "cuda")(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


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


def test_every_declared_op_has_a_cpu_and_a_cuda_kernel():
    for name in _ops.SCHEMAS:
        for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bytetune::{name}", key), (name, key)
            assert callable(backends.implementation(f"bytetune::{name}", device_type))


def test_the_triton_route_is_the_cuda_one_and_forced_cpu(monkeypatch):
    monkeypatch.delenv("BYTETUNE_FORCE_TRITON", raising=False)
    assert backends.runs_triton(torch.device("cuda"))
    assert not backends.runs_triton(torch.device("cpu"))
    assert not backends.runs_triton(torch.device("meta"))
    monkeypatch.setenv("BYTETUNE_FORCE_TRITON", "1")
    assert backends.runs_triton(torch.device("cpu"))


def test_public_ops_send_cuda_tensors_to_triton(triton_calls):
    with FakeTensorMode(), RunCudaKernels():
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
def test_layer_ops_send_cuda_tensors_to_triton(triton_calls, act_bits):
    with FakeTensorMode(), RunCudaKernels():
        # (No backward here: the autograd engine would look for a real CUDA device. The layer ops'
        # backward is their input-gradient op, called as the autograd Function calls it.)
        x = torch.empty(5, 64, device="cuda", dtype=torch.bfloat16)
        grad_y = torch.empty(5, 24, device="cuda", dtype=torch.bfloat16)
        w_int8 = torch.empty(24, 64, device="cuda", dtype=torch.int8)
        w_scale = torch.empty(24, device="cuda")
        llm_int8.int8_linear(x, w_int8, w_scale, None, 6.0, 16)
        _ops.int8_matmul_grad_input(grad_y, w_int8, w_scale)
        codes = torch.empty(24, 32, device="cuda", dtype=torch.uint8)
        scales = torch.empty(24, 2, device="cuda")
        groupwise.groupwise_linear(x, codes, scales, None, 4, 32, act_bits)
        _ops.groupwise_matmul_grad_input(grad_y, codes, scales, 4, 32, 64)
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


def test_cpu_kernels_take_the_reference_unless_forced(monkeypatch):
    ran = []
    monkeypatch.setattr(llm_int8, "column_absmax_triton", lambda x: ran.append("triton") or x.abs().amax(0).float())
    monkeypatch.setattr(llm_int8, "column_absmax_reference", lambda x: ran.append("reference") or x.abs().amax(0).float())
    x = torch.randn(3, 8)
    monkeypatch.delenv("BYTETUNE_FORCE_TRITON", raising=False)
    llm_int8.column_absmax(x)
    monkeypatch.setenv("BYTETUNE_FORCE_TRITON", "1")
    llm_int8.column_absmax(x)
    monkeypatch.setenv("BYTETUNE_FORCE_TRITON", "0")
    llm_int8.column_absmax(x)
    assert ran == ["reference", "triton", "reference"]
