"""Optimizer behaviour: torch parity of the 32-bit path, 8-bit closeness, torch semantics (groups,
schedulers, closures), state layout and bytes, the 32-bit overrides, non-finite gradients,
bitwise resume through torch.save / weights_only / accelerate, and clear errors."""

import copy
import io

import pytest
import torch

import bytetune
from bytetune.optim import Adam8bit, AdamW8bit, Lion8bit, SGD8bit, StableEmbedding, state_bytes_per_param
from tests.conftest import triton_device

TORCH_PEERS = [
    (Adam8bit, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    (AdamW8bit, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (SGD8bit, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1)),
    (SGD8bit, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)),
]
ALL = [
    (Adam8bit, dict(lr=1e-2)),
    (AdamW8bit, dict(lr=1e-2)),
    (SGD8bit, dict(lr=1e-2, nesterov=True)),
    (Lion8bit, dict(lr=1e-3, weight_decay=0.1)),
]
IDS = ["adam", "adamw", "sgd", "lion"]


def _grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def _train(param, opt, grads):
    for g in grads:
        param.grad = g.to(param.dtype)
        opt.step()


@pytest.mark.parametrize("ours,theirs,kwargs", TORCH_PEERS, ids=["adam", "adamw", "sgd", "nesterov"])
def test_32bit_path_matches_torch_and_8bit_stays_close(ours, theirs, kwargs):
    init = torch.randn(64, 80, generator=torch.Generator().manual_seed(1))
    grads = _grads(init.shape, 25)
    p32, p8, pt = (torch.nn.Parameter(init.clone()) for _ in range(3))
    _train(p32, ours([p32], optim_bits=32, **kwargs), grads)
    _train(p8, ours([p8], **kwargs), grads)
    _train(pt, theirs([pt], **kwargs), grads)
    torch.testing.assert_close(p32, pt, rtol=1e-5, atol=1e-5)
    moved = (pt - init).abs().mean()
    assert (p8 - pt).abs().mean() < 0.05 * moved


def test_lion_32bit_matches_textbook():
    init = torch.randn(50, 90, generator=torch.Generator().manual_seed(2))
    grads = _grads(init.shape, 10)
    p = torch.nn.Parameter(init.clone())
    _train(p, Lion8bit([p], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.5, optim_bits=32), grads)
    expected, m = init.double(), torch.zeros_like(init, dtype=torch.float64)
    for g in grads:
        update = torch.sign(0.9 * m + 0.1 * g.double())
        expected = expected * (1 - 1e-2 * 0.5) - 1e-2 * update
        m = 0.99 * m + 0.01 * g.double()
    torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opt_cls,kwargs", ALL, ids=IDS)
def test_state_layout_and_bytes(opt_cls, kwargs):
    big = torch.nn.Parameter(torch.randn(96, 100))  # 9600 >= 4096: 8-bit
    small = torch.nn.Parameter(torch.randn(100))  # < min_8bit_size: fp32
    opt = opt_cls([big, small], **kwargs)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert opt.state[big]["state1"].dtype == torch.uint8
    assert opt.state[big]["absmax1"].shape == (38,)  # ceil(9600 / 256)
    assert opt.state[small]["state1"].dtype == torch.float32
    only_big = opt_cls([torch.nn.Parameter(torch.randn(96, 100))], **kwargs)
    only_big.param_groups[0]["params"][0].grad = torch.randn(96, 100)
    only_big.step()
    limit = 2.05 if opt_cls in (Adam8bit, AdamW8bit) else 1.03
    assert state_bytes_per_param(only_big) <= limit
    full = opt_cls([torch.nn.Parameter(torch.randn(96, 100))], optim_bits=32, **kwargs)
    full.param_groups[0]["params"][0].grad = torch.randn(96, 100)
    full.step()
    assert state_bytes_per_param(full) == (8.0 if opt_cls in (Adam8bit, AdamW8bit) else 4.0)


def test_32bit_overrides_group_key_keep_32bit_and_stable_embedding():
    a, b, c = (torch.nn.Parameter(torch.randn(80, 80)) for _ in range(3))
    emb = StableEmbedding(300, 32)
    opt = Adam8bit([{"params": [a], "optim_bits": 32}, {"params": [b, c, emb.weight]}])
    opt.keep_32bit(c)
    for p in (a, b, c, emb.weight):
        p.grad = torch.randn_like(p)
    opt.step()
    dtypes = [opt.state[p]["state1"].dtype for p in (a, b, c, emb.weight)]
    assert dtypes == [torch.float32, torch.uint8, torch.float32, torch.float32]
    with pytest.raises(RuntimeError, match="before"):
        opt.keep_32bit(b)
    assert bytetune.StableEmbedding is StableEmbedding and bytetune.Adam8bit is Adam8bit


def test_stable_embedding_forward_is_layer_normed():
    torch.manual_seed(0)
    emb = StableEmbedding(50, 16, dtype=torch.bfloat16)
    out = emb(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 16)
    torch.testing.assert_close(out.float().mean(-1), torch.zeros(1, 3), atol=0.02, rtol=0)
    bound = (6 / (50 + 16)) ** 0.5  # xavier-uniform
    assert emb.weight.float().abs().max() <= bound and emb.weight.float().std() > bound / 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_train_with_fp32_math(dtype):
    init = torch.randn(64, 80, generator=torch.Generator().manual_seed(3))
    grads = _grads(init.shape, 10)
    p16 = torch.nn.Parameter(init.to(dtype))
    p32 = torch.nn.Parameter(init.clone())
    _train(p16, AdamW8bit([p16], lr=1e-2), grads)
    _train(p32, AdamW8bit([p32], lr=1e-2), grads)
    assert p16.dtype == dtype
    # 10 steps of 16-bit param rounding (bf16 ulp is 2**-7 relative) on top of the same 8-bit math.
    torch.testing.assert_close(p16.float(), p32.detach(), rtol=0.04, atol=0.02)
    assert (p16.float() - init).abs().mean() > 5 * (p16.float() - p32).abs().mean()


@pytest.mark.parametrize("opt_cls,kwargs", ALL, ids=IDS)
def test_nonfinite_gradients_do_not_poison_state(opt_cls, kwargs):
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = opt_cls([p], **kwargs)
    grads = _grads(p.shape, 4)
    _train(p, opt, grads[:2])
    bad = grads[2].clone()
    bad[0, 0], bad[5, 7] = float("nan"), float("inf")
    before = p.detach().clone()
    p.grad = bad
    opt.step()
    assert p[0, 0] == before[0, 0] and p[5, 7] == before[5, 7]
    for key, value in opt.state[p].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), key
    _train(p, opt, grads[3:])
    assert torch.isfinite(p).all()


def test_groups_schedulers_and_closures():
    a, b = torch.nn.Parameter(torch.randn(70, 70)), torch.nn.Parameter(torch.randn(70, 70))
    opt = AdamW8bit([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    b_before = b.detach().clone()
    target = torch.randn(70, 70)

    def closure():
        opt.zero_grad()
        loss = ((a - target) ** 2).mean() + (b**2).mean()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(3) if sched.step() is None]
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert torch.equal(b, b_before)


def _model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(16, 64, generator=gen), torch.randn(16, 64, generator=gen)) for _ in range(8)]
    return model, batches


def _fit(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("opt_cls,kwargs", ALL, ids=IDS)
@pytest.mark.parametrize("via", ["memory", "torch_save_weights_only"])
def test_resume_is_bitwise_identical(opt_cls, kwargs, via):
    model, batches = _model_and_batches()
    opt = opt_cls(model.parameters(), **kwargs)
    _fit(model, opt, batches[:4])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = opt.state_dict()
    if via == "torch_save_weights_only":
        buffer = io.BytesIO()
        torch.save(saved_opt, buffer)
        buffer.seek(0)
        saved_opt = torch.load(buffer, weights_only=True)
    else:
        saved_opt = copy.deepcopy(saved_opt)
    _fit(model, opt, batches[4:])

    resumed, _ = _model_and_batches(seed=7)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    resumed_opt = opt_cls(resumed.parameters(), **kwargs)
    resumed_opt.load_state_dict(saved_opt)
    _fit(resumed, resumed_opt, batches[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = resumed_opt.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_resume_keeps_fp32_states_of_bf16_params():
    p = torch.nn.Parameter(torch.randn(30, 30, dtype=torch.bfloat16))  # < 4096: fp32 states
    opt = Adam8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    fresh = Adam8bit([p])
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[p]["state1"].dtype == torch.float32
    assert torch.equal(fresh.state[p]["state2"], opt.state[p]["state2"])


def test_resume_through_accelerate_save_state(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model, batches = _model_and_batches()
    accelerator = accelerate.Accelerator(cpu=True)
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    _fit(model, opt, batches[:4])
    accelerator.save_state(str(tmp_path))
    _fit(model, opt, batches[4:])

    resumed, _ = _model_and_batches(seed=7)
    resumed_opt = AdamW8bit(resumed.parameters(), lr=1e-2)
    fresh_accelerator = accelerate.Accelerator(cpu=True)  # a new process's view: one model, one optimizer
    resumed, resumed_opt = fresh_accelerator.prepare(resumed, resumed_opt)
    fresh_accelerator.load_state(str(tmp_path))
    _fit(resumed, resumed_opt, batches[4:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_wrong_state_shape_or_dtype_is_rejected():
    model, batches = _model_and_batches()
    opt = Adam8bit(model.parameters())
    _fit(model, opt, batches[:1])
    sd = opt.state_dict()
    wrong_shape = copy.deepcopy(sd)
    wrong_shape["state"][0]["state1"] = wrong_shape["state"][0]["state1"][:-1]
    with pytest.raises(ValueError, match="state1.*shape"):
        Adam8bit(model.parameters()).load_state_dict(wrong_shape)
    wrong_dtype = copy.deepcopy(sd)
    wrong_dtype["state"][0]["absmax2"] = wrong_dtype["state"][0]["absmax2"].half()
    with pytest.raises(ValueError, match="absmax2.*float32"):
        Adam8bit(model.parameters()).load_state_dict(wrong_dtype)
    other_model = torch.nn.Linear(64, 64)
    with pytest.raises(ValueError, match="parameters"):
        Adam8bit(other_model.parameters()).load_state_dict(sd)


def test_clear_errors():
    with pytest.raises(ValueError, match="momentum > 0"):
        SGD8bit([torch.nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="optim_bits"):
        Adam8bit([torch.nn.Parameter(torch.randn(3))], optim_bits=4)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        Adam8bit(emb.parameters()).step()
    z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    z.grad = torch.randn_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        Lion8bit([z]).step()
    with pytest.raises(ValueError, match="step"):
        state_bytes_per_param(Adam8bit([torch.nn.Parameter(torch.randn(3))]))


def _strided_params(dtype, device="cpu"):
    """Small params of every layout the GPU path must handle: contiguous with a ragged last block,
    transposed, a strided slice, and one under min_8bit_size (fp32 states); same values and
    layouts on every device."""
    gen = torch.Generator().manual_seed(21)
    tensors = [
        torch.randn(300, generator=gen).to(device),
        torch.randn(37, 9, generator=gen).to(device).t(),
        torch.randn(6, 120, generator=gen).to(device)[:, ::2],
        torch.randn(5, generator=gen).to(device),
    ]
    return [torch.nn.Parameter(t.to(dtype) if dtype != torch.float32 else t) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opt_cls,kwargs", ALL, ids=IDS)
def test_triton_path_matches_reference_path(opt_cls, kwargs, dtype, monkeypatch):
    """BYTETUNE_FORCE_TRITON sends these params through the multi-tensor Triton kernel (CPU ones
    in the interpreter, CUDA ones when Triton compiles); the result must match the reference
    path's on CPU params, layouts preserved."""
    if dtype == torch.bfloat16:
        # A step must move a param by many bf16 ulps for the comparison to mean anything.
        kwargs = {**kwargs, "lr": 0.1}
    runs = {}
    for forced in ("1", "0"):
        monkeypatch.setenv("BYTETUNE_FORCE_TRITON", forced)
        params = _strided_params(dtype, triton_device() if forced == "1" else "cpu")
        opt = opt_cls(params, min_8bit_size=64, **kwargs)
        gen = torch.Generator().manual_seed(22)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(p.device)
            if step == 2:
                params[0].grad[7] = float("nan")
            opt.step()
        runs[forced] = (params, opt)
    (p_t, opt_t), (p_r, opt_r) = runs["1"], runs["0"]
    initial = _strided_params(dtype)
    for t, r, p0 in zip(p_t, p_r, initial):
        assert t.stride() == p0.stride(), "the update must keep the param's layout"
        t = t.cpu()
        moved = (r.float() - p0.float()).abs().mean()
        assert moved > 0
        # fp32: rounding of x / absmax may flip a code; bf16: the interpreter truncates stores
        # where torch rounds to nearest (tests/kernels/triton_rounding.py), one ulp per step.
        tolerance = 1e-3 if dtype == torch.float32 else 0.1
        assert (t.float() - r.float()).abs().mean() <= tolerance * moved
    for t, r in zip(p_t, p_r):
        s_t, s_r = {k: v.cpu() if torch.is_tensor(v) else v for k, v in opt_t.state[t].items()}, opt_r.state[r]
        assert s_t["step"] == s_r["step"] == 4
        assert s_t["state1"].dtype == s_r["state1"].dtype
        if s_t["state1"].dtype == torch.uint8:
            assert (s_t["state1"].int() - s_r["state1"].int()).abs().max() <= 1 + (dtype != torch.float32)
            torch.testing.assert_close(s_t["absmax1"], s_r["absmax1"], rtol=0.02 if dtype != torch.float32 else 1e-4, atol=0)
    assert opt_t.state[p_t[0]]["state1"].dtype == torch.uint8 and opt_t.state[p_t[3]]["state1"].dtype == torch.float32
