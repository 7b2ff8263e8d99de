"""Every Triton launcher runs its kernel under its tensors' GPU, checked without a GPU.

Triton launches on ``torch.cuda.current_device()``; a layer on cuda:1 (``device_map="auto"``)
must enter ``torch.cuda.device(1)`` first. Here the tensors are FakeTensors on cuda:1 (no
memory, no CUDA needed), ``torch.cuda.device`` / ``current_device`` are a recorder with GPU 0
current, and each kernel is replaced by a stub that notes which GPU was current when it was
launched.
"""

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bytetune.kernels import blockwise, dispatch, fused_linear_ce, gpu_arch, groupwise, int8_head, llm_int8, optim_update
from bytetune.kernels.llm_int8 import matmul as llm_int8_matmul
from bytetune.kernels.llm_int8 import matmul_grad_input as llm_int8_grad_input
from bytetune.kernels.llm_int8 import outliers as llm_int8_outliers
from bytetune.kernels.llm_int8 import quantize_rows as llm_int8_quantize_rows
from bytetune.kernels.quant_maps import N_CODES

pytestmark = pytest.mark.skipif(not dispatch.HAS_TRITON, reason="triton is not installed")

KERNELS = {
    llm_int8_quantize_rows: ["_quantize_rows_kernel"],
    llm_int8_outliers: ["_column_absmax_kernel"],
    llm_int8_matmul: ["_int8_matmul_kernel", "_int8_matmul_tuned"],
    llm_int8_grad_input: ["_int8_grad_input_kernel", "_int8_grad_input_tuned"],
    groupwise: ["_quantize_groupwise_kernel", "_groupwise_matmul_kernel", "_groupwise_matmul_tuned",
                "_groupwise_grad_input_kernel", "_groupwise_grad_input_tuned"],
    blockwise: ["_quantize_blockwise_kernel", "_dequantize_blockwise_kernel"],
    int8_head: ["_weight_only_matmul_kernel"],
    fused_linear_ce: ["_cross_entropy_rows_kernel"],
    optim_update: ["_optimizer_update_8bit_kernel"],
}


class FakeGpus:
    """torch.cuda.device / current_device on a machine with GPUs 0 and 1, GPU 0 current."""

    def __init__(self):
        self.stack = [0]
        self.entered = []
        self.launches = []  # (kernel name, current GPU at launch, devices of its tensor arguments)

    def current_device(self):
        return self.stack[-1]

    def device(self, index):
        index = index.index if isinstance(index, torch.device) else index
        self.entered.append(index)

        @contextlib.contextmanager
        def guard():
            self.stack.append(index)
            try:
                yield
            finally:
                self.stack.pop()

        return guard()

    def kernel(self, name):
        gpus = self

        class Stub:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    devices = {str(a.device) for a in args if isinstance(a, torch.Tensor)}
                    gpus.launches.append((name, gpus.current_device(), devices))

                return launch

        return Stub()


@pytest.fixture
def gpus(monkeypatch):
    fake = FakeGpus()
    monkeypatch.setattr(torch.cuda, "current_device", fake.current_device)
    monkeypatch.setattr(torch.cuda, "device", fake.device)
    monkeypatch.setattr(gpu_arch, "dot_supported", lambda device: True)
    # an sm_90 card with its shared memory: the launch-config choice asks the device
    monkeypatch.setattr(gpu_arch, "device_arch", lambda device: (90, gpu_arch.ARCHS[90].max_shared_bytes)
                        if torch.device(device).type == "cuda" else None)
    for module, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, fake.kernel(name))
    # Host-side tables the fakes cannot compute (data-dependent shapes, addresses).
    monkeypatch.setattr(optim_update, "_block_tensor_table", lambda numels, bs, device: torch.zeros(
        sum(blockwise.n_blocks(n, bs) for n in numels), dtype=torch.int32, device=device))
    monkeypatch.setattr(optim_update, "_pointer_table", raising=False, value=lambda rows, device: torch.zeros(
        len(rows), 8, dtype=torch.int64, device=device))
    # A FakeTensor on a CUDA device cannot be sliced without CUDA (the midpoints are a slice sum).
    monkeypatch.setattr(blockwise, "code_midpoints", lambda code_map: code_map.new_empty(N_CODES - 1))
    return fake


def _launch_everything(device: str) -> None:
    """One call of every Triton launcher, on tensors of ``device`` (fakes: nothing is computed)."""
    f32, i8 = dict(dtype=torch.float32, device=device), dict(dtype=torch.int8, device=device)
    x, w = torch.empty(5, 64, **f32), torch.empty(24, 64, **f32)
    x8, w8 = torch.empty(5, 64, **i8), torch.empty(24, 64, **i8)
    x_scale, w_scale = torch.ones(5, **f32), torch.ones(24, **f32)
    llm_int8.quantize_rowwise_triton(w)
    llm_int8.column_absmax_triton(x)
    llm_int8.quantize_tokenwise_triton(x, torch.zeros(64, dtype=torch.bool, device=device))
    llm_int8.int8_matmul_triton(x8, w8, x_scale, w_scale)
    llm_int8.int8_matmul_grad_input_triton(torch.empty(5, 24, **f32), w8, w_scale)
    codes, scales = torch.empty(24, 32, dtype=torch.uint8, device=device), torch.ones(24, 2, **f32)
    groupwise.quantize_groupwise_triton(w, bits=4, group_size=32)
    groupwise.groupwise_matmul_triton(x, None, codes, scales, 4, 32)
    groupwise.groupwise_matmul_grad_input_triton(torch.empty(5, 24, **f32), codes, scales, 4, 32, 64)
    code_map = torch.empty(N_CODES, **f32)  # its values do not matter to a stub kernel
    block_codes, absmax = blockwise.quantize_blockwise_triton(torch.empty(300, **f32), code_map)
    blockwise.dequantize_blockwise_triton(block_codes, absmax, code_map)
    int8_head.weight_only_matmul_triton(x, w8, w_scale)
    fused_linear_ce.cross_entropy_rows_triton(torch.empty(5, 24, **f32), torch.zeros(5, dtype=torch.long, device=device))
    params = [torch.empty(300, **f32), torch.empty(7, 9, **f32)]
    book = optim_update.CodeBook(code_map, code_map.new_empty(N_CODES - 1))
    states = optim_update.QuantizedStates(
        [torch.empty(p.numel(), dtype=torch.uint8, device=device) for p in params],
        [torch.ones(blockwise.n_blocks(p.numel(), 256), **f32) for p in params], book)
    optim_update.optimizer_update_8bit_triton(
        optim_update.UpdateKind.LION, optim_update.UpdateScalars(), params, [torch.empty_like(p) for p in params], states)


@pytest.mark.parametrize("autotune", ["0", "1"])
def test_every_launcher_runs_under_its_tensors_gpu(gpus, monkeypatch, autotune):
    monkeypatch.setenv("BYTETUNE_AUTOTUNE", autotune)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _launch_everything("cuda:1")
    launched = {name for name, _, _ in gpus.launches}
    # Every kernel of the registry was reached (the tuned or the fixed-tile GEMMs, by autotune).
    expected = {n for names in KERNELS.values() for n in names if n.endswith("_tuned") == (autotune == "1")}
    expected |= {n for names in KERNELS.values() for n in names if not n.endswith(("_tuned", "_matmul_kernel", "_grad_input_kernel"))}
    assert expected <= launched, sorted(expected - launched)
    wrong = [(name, current) for name, current, devices in gpus.launches if current != 1 or devices != {"cuda:1"}]
    assert not wrong, f"launched with another GPU current: {wrong}"
    assert gpus.stack == [0]  # every guard was left again


def test_the_guard_costs_nothing_when_the_gpu_is_current(gpus):
    with FakeTensorMode(allow_non_fake_inputs=True):
        _launch_everything("cuda:0")
    assert gpus.launches and all(current == 0 for _, current, _ in gpus.launches)
    assert gpus.entered == []  # no torch.cuda.device context was even built


def test_launch_device_picks_the_first_cuda_tensor(gpus):
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_cpu, on_1 = torch.empty(2), torch.empty(2, device="cuda:1")
        with dispatch.launch_device(None, on_cpu, on_1):
            assert torch.cuda.current_device() == 1
    with dispatch.launch_device(torch.empty(2)):  # CPU tensors (the interpreter): no guard at all
        assert torch.cuda.current_device() == 0
    assert gpus.entered == [1]
