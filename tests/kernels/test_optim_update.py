"""The fused 8-bit update: the multi-tensor Triton kernel (interpreter on CPU) against the PyTorch
reference for every optimizer kind, odd sizes, fp32/bf16/fp16 and non-contiguous params; the
reference's batched pieces against one call per tensor (bit for bit); and the reference against
an unfused float64 computation of the same step."""

import collections
import dataclasses
import math

import pytest
import torch

from bytetune.kernels import optim_update
from bytetune.kernels.blockwise import dequantize_blockwise_reference, quantize_blockwise_reference
from bytetune.kernels.optim_update import (
    CodeBook,
    QuantizedStates,
    UpdateKind,
    UpdateScalars,
    launch_count,
    optimizer_update_8bit,
    optimizer_update_8bit_reference,
    optimizer_update_8bit_triton,
    optimizer_update_32bit,
)
from bytetune.kernels.quant_maps import dynamic_map
from tests.conftest import triton_device
from tests.kernels.triton_rounding import cast_like_triton

# ~1e6 runs only on a GPU: the interpreter needs ~0.1 s per 256-element program (measured ~400 s).
SIZES = [1, 255, 256, 257, 4097] + ([1_000_003] if torch.cuda.is_available() else [])


def _scalars(kind: UpdateKind, step: int = 3) -> UpdateScalars:
    lr, b1, b2, wd = 1e-2, 0.9, 0.999, 0.1
    if kind == UpdateKind.ADAM:
        return UpdateScalars(
            beta1=b1, one_minus_beta1=1 - b1, beta2=b2, one_minus_beta2=1 - b2, eps=1e-8,
            l2_decay=wd, param_decay=1 - lr * wd, step_size=lr / (1 - b1**step),
            bias_correction2_sqrt=math.sqrt(1 - b2**step),
        )  # fmt: skip
    if kind == UpdateKind.MOMENTUM:
        return UpdateScalars(lr=lr, beta1=0.9, one_minus_beta1=0.8, l2_decay=wd, momentum=0.9)
    return UpdateScalars(lr=lr, beta1=b1, one_minus_beta1=1 - b1, beta2=0.99, one_minus_beta2=0.01, param_decay=1 - lr * wd)


class Problem:
    """Params, grads and both states of a list of tensors, on ``device``."""

    def __init__(self, shapes, dtype, device, seed=0, transpose=()):
        gen = torch.Generator().manual_seed(seed)
        self.params, self.grads, self.codes, self.absmax = [], [], [[], []], [[], []]
        for index, shape in enumerate(shapes):
            numel = math.prod(shape)
            param = torch.randn(shape, generator=gen).to(dtype).to(device)
            if index in transpose:  # a strided param (and grad): the transpose of a contiguous one
                param = torch.randn(shape[::-1], generator=gen).to(dtype).to(device).t()
            self.params.append(param)
            self.grads.append((torch.randn(param.shape, generator=gen) * 0.1).to(dtype).to(device))
            states = [torch.randn(numel, generator=gen) * 0.05, torch.rand(numel, generator=gen) * 1e-3]
            for k, (state, signed) in enumerate(zip(states, (True, False))):
                codes, absmax = quantize_blockwise_reference(state, dynamic_map(signed))
                self.codes[k].append(codes.to(device))
                self.absmax[k].append(absmax.to(device))
        self.books = [CodeBook.of(dynamic_map(signed, device)) for signed in (True, False)]

    def clone(self, param_dtype=None):
        copy = object.__new__(Problem)
        copy.params = [p.clone() if param_dtype is None else p.to(param_dtype) for p in self.params]
        copy.grads = [g.clone() for g in self.grads]
        copy.codes = [[c.clone() for c in cs] for cs in self.codes]
        copy.absmax = [[a.clone() for a in As] for As in self.absmax]
        copy.books = self.books
        return copy

    def states(self, indices=None):
        indices = range(len(self.params)) if indices is None else indices
        return [QuantizedStates([self.codes[k][i] for i in indices], [self.absmax[k][i] for i in indices], self.books[k]) for k in (0, 1)]

    def run(self, impl, kind, nesterov, indices=None):
        indices = list(range(len(self.params))) if indices is None else indices
        state1, state2 = self.states(indices)
        impl(kind, _scalars(kind), [self.params[i] for i in indices], [self.grads[i] for i in indices], state1, state2, nesterov)
        return self


def _assert_codes_close(a, b):
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1, "codes more than one step apart"
    assert diff.count_nonzero().item() <= max(1, int(1e-3 * a.numel())), "too many off-by-one codes"


def _assert_triton_matches_reference(triton_run, reference_run, kind, dtype):
    for k in range(2 if kind == UpdateKind.ADAM else 1):
        for a_t, a_r, c_t, c_r in zip(triton_run.absmax[k], reference_run.absmax[k], triton_run.codes[k], reference_run.codes[k]):
            torch.testing.assert_close(a_t, a_r, rtol=1e-6, atol=0)
            _assert_codes_close(c_t, c_r)
    for p_t, p_r in zip(triton_run.params, reference_run.params):
        if dtype == torch.float32:
            torch.testing.assert_close(p_t, p_r, rtol=1e-6, atol=1e-7)
        else:
            # 16-bit: identical up to one unit in the last place where fp32 results straddle a rounding edge.
            expected = cast_like_triton(p_r, dtype)
            assert (p_t != expected).count_nonzero().item() <= max(1, int(1e-3 * p_t.numel()))
            torch.testing.assert_close(p_t.float(), expected.float(), rtol=2**-7, atol=0)


CASES = [(UpdateKind.ADAM, False), (UpdateKind.MOMENTUM, False), (UpdateKind.MOMENTUM, True), (UpdateKind.LION, False)]
CASE_IDS = ["adam", "sgd", "nesterov", "lion"]

# Every size for Adam; the one-state kinds skip the one-block sizes 255/256 to save interpreter time.
KERNEL_CASES = [
    pytest.param(kind, nesterov, numel, id=f"{name}-{numel}")
    for (kind, nesterov), name in zip(CASES, CASE_IDS)
    for numel in SIZES
    if kind == UpdateKind.ADAM or numel not in (255, 256)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,nesterov,numel", KERNEL_CASES)
def test_fused_kernel_matches_reference(kind, nesterov, numel, dtype, device):
    problem = Problem([(numel,)], dtype, device, seed=numel)
    problem.grads[0][numel // 2] = float("nan")  # the non-finite rule must hold in both paths
    triton_run = problem.clone().run(optimizer_update_8bit_triton, kind, nesterov)
    # The reference writes params in the param dtype; run it on fp32 params to apply the
    # interpreter's 16-bit store rounding to its fp32 result (see triton_rounding).
    reference_run = problem.clone(torch.float32).run(optimizer_update_8bit_reference, kind, nesterov)
    _assert_triton_matches_reference(triton_run, reference_run, kind, dtype)
    assert triton_run.params[0][numel // 2] == problem.params[0][numel // 2], "a nan gradient must leave its param unchanged"


SHAPES = [(3, 85), (1,), (17, 31), (256,), (2, 4097), (7, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,nesterov", CASES, ids=CASE_IDS)
def test_one_launch_updates_many_strided_tensors(kind, nesterov, dtype, device):
    # Odd shapes (ragged last blocks), two strided params, a nan gradient: one launch for all.
    problem = Problem(SHAPES, dtype, device, seed=11, transpose=(0, 2))
    problem.grads[4][1, 5] = float("nan")
    before = launch_count["optimizer_update_8bit"]
    triton_run = problem.clone().run(optimizer_update_8bit_triton, kind, nesterov)
    assert launch_count["optimizer_update_8bit"] - before == 1
    reference_run = problem.clone(torch.float32).run(optimizer_update_8bit_reference, kind, nesterov)
    _assert_triton_matches_reference(triton_run, reference_run, kind, dtype)
    assert not triton_run.params[0].is_contiguous(), "a strided param must be updated in place"
    assert triton_run.params[4][1, 5] == problem.params[4][1, 5]


def test_one_launch_per_param_dtype(device):
    problem = Problem(SHAPES[:2], torch.float32, device, seed=12)
    problem.params[1] = problem.params[1].to(torch.float16)
    problem.grads[1] = problem.grads[1].to(torch.float16)
    before = launch_count["optimizer_update_8bit"]
    triton_run = problem.clone().run(optimizer_update_8bit_triton, UpdateKind.ADAM, False)
    assert launch_count["optimizer_update_8bit"] - before == 2
    reference_run = problem.clone(torch.float32).run(optimizer_update_8bit_reference, UpdateKind.ADAM, False)
    torch.testing.assert_close(triton_run.params[0], reference_run.params[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(triton_run.params[1], reference_run.params[1].half(), rtol=2**-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,nesterov", CASES, ids=CASE_IDS)
def test_batched_reference_equals_one_call_per_tensor(kind, nesterov, dtype, monkeypatch):
    """Pieces that mix tensors, split big ones and pad ragged blocks give bit for bit the result of
    updating each tensor on its own."""
    import bytetune.kernels.optim_update as optim_update

    monkeypatch.setattr(optim_update, "CPU_PIECE_ELEMENTS", 3 * 256)  # pieces cut through tensors
    problem = Problem(SHAPES, dtype, "cpu", seed=13, transpose=(2,))
    problem.grads[1][0] = float("inf")
    batched = problem.clone().run(optimizer_update_8bit_reference, kind, nesterov)
    single = problem.clone()
    for index in range(len(SHAPES)):
        single.run(optimizer_update_8bit_reference, kind, nesterov, indices=[index])
    for k in range(2):
        for a, b in zip(batched.codes[k] + batched.absmax[k], single.codes[k] + single.absmax[k]):
            assert torch.equal(a, b)
    for a, b in zip(batched.params, single.params):
        assert torch.equal(a, b)
    assert all(not torch.equal(a, b) for a, b in zip(batched.params[2:], problem.params[2:])), "params must move"


def test_32bit_batched_equals_one_call_per_tensor(monkeypatch):
    import bytetune.kernels.optim_update as optim_update

    monkeypatch.setattr(optim_update, "CPU_PIECE_ELEMENTS", 100)
    gen = torch.Generator().manual_seed(14)
    params = [torch.randn(s, generator=gen) for s in SHAPES[:4]] + [torch.randn(9, 5, generator=gen).t()]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    states = [[torch.randn(p.shape, generator=gen).abs() for p in params] for _ in range(2)]
    batched_p, batched_s = [p.clone() for p in params], [[s.clone() for s in ss] for ss in states]
    optimizer_update_32bit(UpdateKind.ADAM, _scalars(UpdateKind.ADAM), batched_p, grads, *batched_s)
    for i in range(len(params)):
        p, s1, s2 = params[i].clone(), states[0][i].clone(), states[1][i].clone()
        optimizer_update_32bit(UpdateKind.ADAM, _scalars(UpdateKind.ADAM), [p], [grads[i]], [s1], [s2])
        assert torch.equal(p, batched_p[i]) and torch.equal(s1, batched_s[0][i]) and torch.equal(s2, batched_s[1][i])
        assert not torch.equal(p, params[i])


@pytest.mark.parametrize("kind,nesterov", CASES, ids=CASE_IDS)
def test_reference_step_against_float64(kind, nesterov):
    """The 8-bit reference = dequantize, textbook fp64 update, requantize (up to fp32 rounding)."""
    problem = Problem([(700,)], torch.float32, "cpu", seed=5)
    param, grad = problem.params[0], problem.grads[0]
    sm, um = (book.codes for book in problem.books)
    s = _scalars(kind)
    m = dequantize_blockwise_reference(problem.codes[0][0], problem.absmax[0][0], sm).double()
    v = dequantize_blockwise_reference(problem.codes[1][0], problem.absmax[1][0], um).double()
    p, g = param.double(), grad.double() + s.l2_decay * param.double()
    if kind == UpdateKind.ADAM:
        m = s.beta1 * m + s.one_minus_beta1 * g
        v = s.beta2 * v + s.one_minus_beta2 * g * g
        expected_p = p * s.param_decay - s.step_size * m / (v.sqrt() / s.bias_correction2_sqrt + s.eps)
    elif kind == UpdateKind.MOMENTUM:
        m = s.beta1 * m + s.one_minus_beta1 * g
        expected_p = p - s.lr * (g + s.momentum * m if nesterov else m)
    else:
        expected_p = p * s.param_decay - s.lr * torch.sign(s.beta1 * m + s.one_minus_beta1 * g)
        m = s.beta2 * m + s.one_minus_beta2 * g
    problem.run(optimizer_update_8bit_reference, kind, nesterov)
    torch.testing.assert_close(param.double(), expected_p, rtol=1e-5, atol=1e-6)
    expected_m_codes, expected_m_absmax = quantize_blockwise_reference(m.float(), sm)
    torch.testing.assert_close(problem.absmax[0][0], expected_m_absmax, rtol=1e-5, atol=0)
    _assert_codes_close(problem.codes[0][0], expected_m_codes)


def test_nonfinite_gradient_resets_state_not_block():
    problem = Problem([(512,)], torch.float32, "cpu", seed=9)
    problem.grads[0][3], problem.grads[0][4] = float("inf"), float("nan")
    before = problem.params[0].clone()
    problem.run(optimizer_update_8bit_reference, UpdateKind.ADAM, False)
    param = problem.params[0]
    m = dequantize_blockwise_reference(problem.codes[0][0], problem.absmax[0][0], problem.books[0].codes)
    v = dequantize_blockwise_reference(problem.codes[1][0], problem.absmax[1][0], problem.books[1].codes)
    assert torch.isfinite(problem.absmax[0][0]).all() and torch.isfinite(problem.absmax[1][0]).all()
    assert m[3] == 0 and m[4] == 0 and v[3] == 0 and v[4] == 0
    assert param[3] == before[3] and param[4] == before[4]
    assert (param[5:] != before[5:]).float().mean() > 0.9


def test_dispatch_and_bad_state_shapes_are_rejected(monkeypatch):
    problem = Problem([(300,)], torch.float32, "cpu")
    state1, _ = problem.states()
    lion = _scalars(UpdateKind.LION)
    bad_absmax = QuantizedStates(state1.codes, [state1.absmax[0][:1]], state1.book)
    with pytest.raises(ValueError, match="absmax"):
        optimizer_update_8bit_reference(UpdateKind.LION, lion, problem.params, problem.grads, bad_absmax)
    bad_codes = QuantizedStates([state1.codes[0].float()], state1.absmax, state1.book)
    with pytest.raises(ValueError, match="uint8"):
        optimizer_update_8bit_reference(UpdateKind.LION, lion, problem.params, problem.grads, bad_codes)
    with pytest.raises(ValueError, match="one per param"):
        optimizer_update_8bit_reference(UpdateKind.LION, lion, problem.params * 2, problem.grads, state1)
    # CPU tensors take the reference unless BYTETUNE_FORCE_TRITON asks for the kernel (whose
    # tensors must be on the GPU when Triton compiles for real).
    for forced, launches in (("0", 0), ("1", 1)):
        monkeypatch.setenv("BYTETUNE_FORCE_TRITON", forced)
        run = problem if forced == "0" else Problem([(300,)], torch.float32, triton_device())
        state1, _ = run.states()
        before = launch_count["optimizer_update_8bit"]
        optimizer_update_8bit(UpdateKind.LION, lion, run.params, run.grads, state1)
        assert launch_count["optimizer_update_8bit"] - before == launches


@pytest.mark.parametrize("numel", [300, 4097])
def test_positive_second_moment_never_rounds_to_code_zero(numel, device):
    """Adam's v is a denominator: with its book (``CodeBook.for_denominator``, what the Adam
    optimizers use) a positive v far below its block's absmax takes the smallest nonzero code,
    never code 0 (issue 22), in the kernel and the reference alike; a zero v stays 0."""
    problem = Problem([(numel,)], torch.float32, device, seed=21)
    problem.books = [problem.books[0], CodeBook.for_denominator(dynamic_map(False, device))]
    zero_v = torch.zeros(numel)
    codes, absmax = quantize_blockwise_reference(zero_v, dynamic_map(False))
    problem.codes[1][0], problem.absmax[1][0] = codes.to(device), absmax.to(device)
    gen = torch.Generator().manual_seed(22)
    # Per block: one gradient of 1, the rest spread over 1e-7..1e-2 of it, every 7th exactly 0.
    grad = 10.0 ** -torch.empty(numel).uniform_(2, 7, generator=gen) * torch.randn(numel, generator=gen).sign()
    grad[::256] = 1.0
    grad[3::7] = 0.0
    problem.grads[0] = grad.to(device)
    problem.params[0].zero_()  # no L2 term: a zero gradient means a zero v
    s = _scalars(UpdateKind.ADAM)
    for impl in (optimizer_update_8bit_triton, optimizer_update_8bit_reference):
        run = problem.clone()
        state1, state2 = run.states()
        impl(UpdateKind.ADAM, dataclasses.replace(s, l2_decay=0.0), run.params, run.grads, state1, state2)
        v_codes = run.codes[1][0].cpu()
        positive = grad != 0
        assert (v_codes[positive] >= 1).all(), f"{impl.__name__}: a positive v rounded to code 0"
        assert (v_codes[~positive] == 0).all(), f"{impl.__name__}: a zero v moved off code 0"
        assert (v_codes[positive] == 1).sum() > numel // 4, "the case must reach the smallest code"
        if impl is optimizer_update_8bit_triton:
            triton_codes = v_codes
        else:
            _assert_codes_close(triton_codes, v_codes)


def test_denominator_book_changes_only_the_rounding_to_zero():
    plain, denominator = CodeBook.of(dynamic_map(False)), CodeBook.for_denominator(dynamic_map(False))
    assert denominator.midpoints[0] == 0 and plain.midpoints[0] > 0
    assert torch.equal(plain.midpoints[1:], denominator.midpoints[1:]) and torch.equal(plain.codes, denominator.codes)
    with pytest.raises(ValueError, match="unsigned"):
        CodeBook.for_denominator(dynamic_map(True))


def test_pointer_table_is_built_once_and_again_only_when_a_tensor_moves(monkeypatch):
    """Steps over the same tensors reuse their device table (no host-to-device copy per step, a
    fixed buffer for CUDA graphs); a param at a new address gets a new table, never a stale one."""
    built = []
    build = optim_update._build_pointer_table
    monkeypatch.setattr(optim_update, "_build_pointer_table", lambda rows, device: built.append(rows) or build(rows, device))
    monkeypatch.setattr(optim_update, "_pointer_tables", collections.OrderedDict())
    problem = Problem([(300,), (37, 9), (5,)], torch.float32, triton_device(), seed=12)
    for _ in range(3):
        problem.run(optimizer_update_8bit_triton, UpdateKind.ADAM, False)
    assert len(built) == 1
    old = problem.params[1]
    problem.params[1] = old.clone()  # what load_state_dict or a re-materialised param does
    before = old.clone()
    reference = problem.clone().run(optimizer_update_8bit_reference, UpdateKind.ADAM, False)
    problem.run(optimizer_update_8bit_triton, UpdateKind.ADAM, False)
    assert len(built) == 2 and problem.params[1].data_ptr() in built[1][1]
    assert torch.equal(old, before)  # the stale address was not written
    torch.testing.assert_close(problem.params[1], reference.params[1], rtol=1e-6, atol=1e-7)
    problem.run(optimizer_update_8bit_triton, UpdateKind.ADAM, False)
    assert len(built) == 2
