"""The quantized layers on the GPU path's terms: no host sync in forward or backward, and
torch.compile traces a model with Int8Linear, GroupQuantLinear and a PEFT LoRA wrapper whole."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from bytetune import GroupQuantLinear, Int8Linear
from bytetune.kernels import llm_int8
from bytetune.quant_layers.group_lora import zeroquant_lora_config

from .conftest import no_host_sync

IN, HIDDEN, OUT = 48, 40, 24


class TinyQuantModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # threshold 2.5 on unit normals: a few outlier columns in every batch.
        self.int8 = Int8Linear.from_linear(nn.Linear(IN, HIDDEN), threshold=2.5)
        self.group = GroupQuantLinear.from_linear(nn.Linear(HIDDEN, OUT), bits=4, group_size=32, act_bits=8)

    def forward(self, x):
        return self.group(torch.relu(self.int8(x)))


def lora_model() -> nn.Module:
    config = zeroquant_lora_config(r=4, target_modules=["int8", "group"], init_lora_weights=False)
    return get_peft_model(TinyQuantModel(), config)


def batch(seed=1):
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("autocast", [False, True])
def test_forward_and_backward_never_wait_for_the_device(kernel_path, autocast, monkeypatch):
    if kernel_path == "reference":
        # CPU tensors take the CPU layer path, which reads the outlier count (a CPU has no device
        # to wait for). The route GPU tensors take is checked here with the reference ops in
        # place of the Triton kernels; the "triton" run checks it with the kernels.
        monkeypatch.setattr(llm_int8, "int8_linear_reference", llm_int8.int8_linear_fixed_capacity)
    model = lora_model()
    x = batch().requires_grad_(True)
    with no_host_sync() as detector, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(x).float().sum().backward()
    # Eager mode goes through the registered ops, as torch.compile does (the detector stepped
    # into their kernels), and the outlier columns were really searched for.
    assert {"bytetune.int8_linear.default", "bytetune.groupwise_linear.default"} <= detector.seen
    assert {"bytetune.int8_matmul_grad_input.default", "bytetune.groupwise_matmul_grad_input.default"} <= detector.seen
    assert "aten.topk.default" in detector.seen
    assert x.grad is not None and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for torch.cuda.set_sync_debug_mode")
def test_cuda_forward_and_backward_never_sync():
    model = lora_model().cuda()
    x = batch().cuda().requires_grad_(True)
    model(x).sum().backward()  # first call: autotuning and compiling may sync
    torch.cuda.synchronize()
    x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("autocast", [False, True])
def test_dynamo_sees_no_graph_break(autocast):
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explanation = torch._dynamo.explain(lora_model())(batch())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend, autocast", [("eager", False), ("aot_eager", False), ("aot_eager", True)])
def test_compiled_model_matches_eager(backend, autocast):
    torch._dynamo.reset()
    model = lora_model()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    results = []
    for run in (model, compiled):
        x = batch().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = run(x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        y.backward(torch.ones_like(y))
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        results.append((y.detach(), x.grad, grads))
    (y_eager, gx_eager, grads_eager), (y_comp, gx_comp, grads_comp) = results
    # The same ops run in the same order: equal to the bit.
    assert torch.equal(y_comp, y_eager)
    assert torch.equal(gx_comp, gx_eager)
    assert len(grads_eager) == 4 and all(torch.equal(a, b) for a, b in zip(grads_comp, grads_eager))
