import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import _pytree as pytree
from torch.utils._pytree import tree_map

from bytetune.kernels import backends, groupwise, int8_head, llm_int8
from bytetune.kernels.dispatch import HAS_TRITON

from ..conftest import triton_compiles, triton_device

# The functions through which the layers reach a Triton kernel.
TRITON_ENTRY_POINTS = [
    (llm_int8, name)
    for name in (
        "quantize_rowwise_triton",
        "column_absmax_triton",
        "quantize_tokenwise_triton",
        "int8_matmul_triton",
        "int8_matmul_grad_input_triton",
    )
] + [
    (groupwise, name)
    for name in ("quantize_groupwise_triton", "groupwise_matmul_triton", "groupwise_matmul_grad_input_triton")
] + [(int8_head, "weight_only_matmul_triton")]


def _moved(tree, device):
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


@pytest.fixture(params=["reference", "triton"])
def kernel_path(request, monkeypatch):
    """Runs a test on CPU tensors through the PyTorch references, then through the Triton kernels
    (BYTETUNE_FORCE_TRITON=1, interpreted: conftest sets TRITON_INTERPRET=1 before triton is
    imported), and checks afterwards that the path asked for is the one that ran.

    When Triton compiles for real (TRITON_INTERPRET=0, bench/gpu_check.sh) a kernel cannot read
    CPU memory: each Triton entry point then gets its tensor arguments on the GPU and hands its
    results back on the caller's device, so the test itself is unchanged (no GPU: a skip)."""
    gpu = None
    if request.param == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        if triton_compiles():
            gpu = triton_device()
        monkeypatch.setenv("BYTETUNE_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("BYTETUNE_FORCE_TRITON", raising=False)
    calls = []
    for module, name in TRITON_ENTRY_POINTS:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            if gpu is None:
                return _original(*args, **kwargs)
            home = next(t.device for t in args if isinstance(t, torch.Tensor))
            return _moved(_original(*_moved(args, gpu), **_moved(kwargs, gpu)), home)

        monkeypatch.setattr(module, name, counted)
    yield request.param
    if request.param == "triton":
        assert calls, "BYTETUNE_FORCE_TRITON=1 but no Triton kernel ran"
    else:
        assert not calls, f"CPU tensors reached Triton kernels: {sorted(set(calls))}"


# Ops whose result the host must wait for: nonzero's output shape depends on the data, and
# _local_scalar_dense is what .item(), bool(tensor) and int(tensor) dispatch to.
HOST_SYNC_OPS = {
    torch.ops.aten.nonzero.default,
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten._unique2.default,
}


INDEX_OPS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


class HostSyncDetector(TorchDispatchMode):
    """Records every aten op and fails on those that wait for the device.

    A dispatch mode does not see the ops inside a custom op's implementation (the dispatcher runs
    it below the Python key), so for ``bytetune::`` ops the mode runs the kernel registered for
    the tensors' device itself, with the mode still active. Use it through :func:`no_host_sync`, which also catches
    ``.tolist()`` (on CPU it reads memory without dispatching an op)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.add(str(func))
        if func in HOST_SYNC_OPS:
            raise AssertionError(f"{func} makes the host wait for the device")
        if func in INDEX_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None
        ):
            raise AssertionError(f"{func} with a boolean mask calls nonzero: the host waits for the device")
        if func.namespace == "bytetune":
            device = next(t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)).device
            with self:
                return backends.implementation(func._schema.name, device.type)(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync():
    """Inside, any op that makes the host wait for the device raises AssertionError; yields the
    detector (its ``seen`` set names every op that ran)."""

    def refuse_tolist(self):
        raise AssertionError(".tolist() makes the host wait for the device")

    tolist = torch.Tensor.tolist
    torch.Tensor.tolist = refuse_tolist
    try:
        with HostSyncDetector() as detector:
            yield detector
    finally:
        torch.Tensor.tolist = tolist
