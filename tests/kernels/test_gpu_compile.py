"""The compile gate (bench/gpu_compile.py) and the arch-aware launch rules it checks.

The CI subset compiles one config per kernel for sm_86 and sm_90 with the ptxas of the triton
wheel (no GPU needed). The other tests here run on the rules and on fabricated compile results,
so the gate's verdicts are tested both ways: a good config passes, a bad one fails.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bytetune.kernels import gpu_arch, groupwise, llm_int8
from bytetune.kernels.llm_int8 import matmul, matmul_grad_input
from bytetune.kernels.gpu_arch import ARCHS

triton = pytest.importorskip("triton")
tl = triton.language

ROOT = Path(__file__).resolve().parents[2]
GATE = ROOT / "bench" / "gpu_compile.py"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
needs_ptxas = pytest.mark.skipif(not PTXAS.exists(), reason="the triton wheel ships no ptxas")


def _run_gate_code(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # A fresh process: the gate needs compiled (not interpreted) JIT functions.
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0")
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@needs_ptxas
def test_ci_subset_compiles_for_sm86_and_sm90(tmp_path):
    table = tmp_path / "gate.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0")
    done = subprocess.run(
        [sys.executable, str(GATE), "--subset", "--arch", "86", "90", "--jobs", "2", "--output", str(table)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    text = table.read_text()
    assert "**0 fail**" in text
    for kernel in ("_int8_matmul_kernel", "_groupwise_matmul_kernel", "_optimizer_update_8bit_kernel"):
        assert kernel in text


@needs_ptxas
def test_gate_fails_an_oversized_tile_and_passes_a_good_one():
    # A real compile: a 64x64x256 int8 tile pipelined over 8 stages needs ~224 KiB of shared memory
    # on sm_86 (few registers, so it compiles fast). Its shared-memory estimate is left out, so
    # the launch rule lets it through and only the compiled figure can stop it.
    code = """
import sys; sys.path.insert(0, "bench")
import gpu_compile as g
from bytetune.kernels import gpu_arch, llm_int8
good = next(l for l in g.llm_int8_launches() if l.ci and l.name.endswith("_int8_matmul_kernel"))
huge = gpu_arch.tile(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=8)
bad = g.Launch(good.kernel, huge, "oversized", good.args, dict(good.constexprs, **huge.kwargs))
rows = g.run_gate([good, bad], [86], jobs=2)
print("VERDICTS", [r.failure for r in rows], rows[1].result.shared)
"""
    done = _run_gate_code(code)
    assert done.returncode == 0, done.stderr[-3000:]
    verdict = done.stdout.split("VERDICTS", 1)[1]
    assert "[None, 'over the shared-memory limit']" in verdict


def _gate_module():
    spec = importlib.util.spec_from_file_location("bytetune_gpu_compile_gate", GATE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    # The gate sets TRITON_INTERPRET=0 for its own process; keep this one's setting.
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return module


@pytest.fixture(scope="module")
def gate():
    return _gate_module()


def _row(gate, launch, capability, **result):
    compiled = gate.Result(**{"compiled": True, **result})
    return gate.Row(launch, capability, compiled, launch.blocked(capability, ARCHS[capability].max_shared_bytes))


@pytest.mark.parametrize(
    "result, failure",
    [
        (dict(shared=48 * 1024, registers=128, spill=0), None),
        (dict(shared=ARCHS[86].max_shared_bytes + 16, registers=128), "over the shared-memory limit"),
        (dict(shared=48 * 1024, registers=255, spill=664), "spills"),
        (dict(compiled=False, error="RuntimeError: PassManager::run failed"), "does not compile"),
    ],
)
def test_gate_verdict_on_a_launchable_row(gate, result, failure):
    launch = next(l for l in gate.llm_int8_launches() if l.ci and l.name.endswith("_int8_matmul_kernel"))
    assert _row(gate, launch, 86, **result).failure == failure


def test_gate_never_fails_a_row_that_cannot_launch(gate):
    # An int8-dot kernel on sm_75 does not compile, and need not: the op falls back there.
    launch = next(l for l in gate.llm_int8_launches() if l.ci and l.name.endswith("_int8_matmul_kernel"))
    row = _row(gate, launch, 75, compiled=False, error="RuntimeError: PassManager::run failed")
    assert row.blocked == "kernel needs sm_80+"
    assert row.failure is None


def test_registry_has_a_ci_row_per_kernel_and_covers_every_menu(gate):
    launches = gate.all_launches()
    kernels = {l.name for l in launches}
    assert kernels == {l.name for l in launches if l.ci}
    for module, menu_name, kernel in [
        (llm_int8, "MATMUL_TILES", "_int8_matmul_kernel"),
        (llm_int8, "GRAD_INPUT_TILES", "_int8_grad_input_kernel"),
        (llm_int8, "GRAD_INPUT_TILES_FP32", "_int8_grad_input_kernel"),
        (groupwise, "MATMUL_TILES", "_groupwise_matmul_kernel"),
        (groupwise, "GRAD_INPUT_TILES", "_groupwise_grad_input_kernel"),
        (groupwise, "MATMUL_TILES_FP32", "_groupwise_matmul_kernel"),
        (groupwise, "GRAD_INPUT_TILES_FP32", "_groupwise_grad_input_kernel"),
    ]:
        gated = {l.config for l in launches if l.name.endswith(kernel)}
        assert set(getattr(module, menu_name)) <= gated, f"{menu_name} of {module.__name__} is not in the gate"


# ------------------------------------------------------------------ arch-aware menus


@pytest.mark.parametrize("capability", sorted(c for c in ARCHS if c >= gpu_arch.DOT_MIN_CAPABILITY))
@pytest.mark.parametrize("m", [1, 4096])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_prune_keeps_configs_that_fit_the_device(monkeypatch, capability, m, out_dtype):
    arch = ARCHS[capability]
    monkeypatch.setattr(gpu_arch, "device_arch", lambda device: (capability, arch.max_shared_bytes))
    configs = gpu_arch.triton_configs(llm_int8.MATMUL_TILES)
    named = {"M_BUCKET": gpu_arch.m_bucket(m), "x_ptr": torch.empty(1, dtype=torch.int8),
             "out_ptr": torch.empty(1, dtype=out_dtype)}  # fmt: skip
    kept = matmul._prune_matmul_configs(configs, named)
    assert kept, "every generation from sm_80 on needs at least one config"
    by_key = {t.key(): t for t in llm_int8.MATMUL_TILES}
    for config in kept:
        tile = by_key[gpu_arch.config_key(config)]
        assert llm_int8.matmul_shared_bytes(tile, out_dtype.itemsize) <= arch.max_shared_bytes
        assert capability >= tile.min_capability
    # Only the rule removed configs: the largest tiles stay where they fit.
    dropped = [by_key[gpu_arch.config_key(c)] for c in configs if c not in kept]
    for tile in dropped:
        if (tile["BLOCK_M"] <= 32) == (m <= 32):
            assert gpu_arch.launchable(tile, capability, arch.max_shared_bytes,
                                       lambda t: llm_int8.matmul_shared_bytes(t, out_dtype.itemsize))  # fmt: skip


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capability", [80, 86, 90])
def test_int8_grad_input_prune_takes_the_fp32_menu_for_fp32_dots(monkeypatch, grad_dtype, capability):
    monkeypatch.setattr(gpu_arch, "device_arch", lambda device: (capability, ARCHS[capability].max_shared_bytes))
    fp32 = grad_dtype == torch.float32
    menu = llm_int8.GRAD_INPUT_TILES_FP32 if fp32 else llm_int8.GRAD_INPUT_TILES
    configs = gpu_arch.triton_configs(llm_int8.GRAD_INPUT_TILES + llm_int8.GRAD_INPUT_TILES_FP32)
    for m in (1, 4096):
        named = {"M_BUCKET": gpu_arch.m_bucket(m), "grad_y_ptr": torch.empty(1, dtype=grad_dtype)}
        kept = matmul_grad_input._prune_grad_input_configs(configs, named, DOT_IN_FP32=fp32)
        assert kept and {gpu_arch.config_key(c) for c in kept} <= {t.key() for t in menu}


@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("group_size", [32, 96, 128])
@pytest.mark.parametrize("capability", [86, 90])
def test_groupwise_prune_keeps_k_tiles_inside_a_group(monkeypatch, fp32, group_size, capability):
    monkeypatch.setattr(gpu_arch, "device_arch", lambda device: (capability, ARCHS[capability].max_shared_bytes))
    dtype = torch.float32 if fp32 else torch.bfloat16
    for m in (1, 4096):
        named = {"M_BUCKET": gpu_arch.m_bucket(m), "x_ptr": torch.empty(1, dtype=dtype)}
        kept = groupwise._prune_matmul_configs(
            gpu_arch.triton_configs(groupwise.MATMUL_TILES + groupwise.MATMUL_TILES_FP32), named,
            GROUP_SIZE=group_size, X_INT8=False, FP32_DOT=fp32,
        )  # fmt: skip
        menu = groupwise.MATMUL_TILES_FP32 if fp32 else groupwise.MATMUL_TILES
        assert kept and all(group_size % c.kwargs["BLOCK_K"] == 0 for c in kept)
        assert {gpu_arch.config_key(c) for c in kept} <= {t.key() for t in menu}
        named = {"M_BUCKET": gpu_arch.m_bucket(m), "grad_y_ptr": torch.empty(1, dtype=dtype)}
        kept = groupwise._prune_grad_input_configs(
            gpu_arch.triton_configs(groupwise.GRAD_INPUT_TILES + groupwise.GRAD_INPUT_TILES_FP32), named,
            GROUP_SIZE=group_size, FP32_DOT=fp32,
        )  # fmt: skip
        menu = groupwise.GRAD_INPUT_TILES_FP32 if fp32 else groupwise.GRAD_INPUT_TILES
        assert kept and all(group_size % c.kwargs["BLOCK_K"] == 0 for c in kept)
        assert {gpu_arch.config_key(c) for c in kept} <= {t.key() for t in menu}


def test_launchable_reasons():
    big = gpu_arch.tile(BLOCK_M=128, num_warps=8, num_stages=3, min_capability=90)
    assert gpu_arch.launchable(big, 86, 99 * 1024, lambda t: 1024) == "needs sm_90+"
    assert gpu_arch.launchable(big, 90, 227 * 1024, lambda t: 300 * 1024) == f"shared {300 * 1024} > {227 * 1024}"
    assert gpu_arch.launchable(big, 90, 227 * 1024, lambda t: 100 * 1024) is None


def test_device_arch_is_none_off_cuda():
    assert gpu_arch.device_arch(torch.device("cpu")) is None


# ------------------------------------------------------------------ fallback below sm_80


def _int8_operands(m=7, n=33, k=65):
    x, x_scale = llm_int8.quantize_tokenwise_reference(torch.randn(m, k))
    w, w_scale = llm_int8.quantize_rowwise_reference(torch.randn(n, k))
    return x, w, x_scale, w_scale


def test_int8_matmul_falls_back_once_with_one_warning_below_sm80(monkeypatch):
    monkeypatch.setattr(gpu_arch, "device_arch", lambda device: (75, ARCHS[75].max_shared_bytes))
    gpu_arch._dot_runs_on.cache_clear()
    monkeypatch.setattr(matmul, "_int8_matmul_kernel", None)  # the kernel must not be reached
    calls = []
    reference = matmul.int8_matmul_reference
    monkeypatch.setattr(matmul, "int8_matmul_reference", lambda *a: calls.append(1) or reference(*a))
    x, w, x_scale, w_scale = _int8_operands()
    try:
        with pytest.warns(UserWarning, match=r"^sm_75 GPU: bytetune's Triton GEMMs need sm_80\+") as record:
            out = llm_int8.int8_matmul_triton(x, w, x_scale, w_scale, None, torch.bfloat16)
        assert len(record) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # chosen once: no second warning
            again = llm_int8.int8_matmul_triton(x, w, x_scale, w_scale, None, torch.bfloat16)
    finally:
        gpu_arch._dot_runs_on.cache_clear()
    assert len(calls) == 2
    expected = reference(x, w, x_scale, w_scale, None, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected) and torch.equal(again, expected)


def test_groupwise_w8a8_falls_back_below_sm80(monkeypatch):
    monkeypatch.setattr(gpu_arch, "device_arch", lambda device: (75, ARCHS[75].max_shared_bytes))
    gpu_arch._dot_runs_on.cache_clear()
    monkeypatch.setattr(groupwise, "_groupwise_matmul_kernel", None)
    monkeypatch.setattr(groupwise, "_groupwise_matmul_tuned", None)
    codes, scales = groupwise.quantize_groupwise_reference(torch.randn(33, 64), 8, 32)
    x, x_scale = groupwise.quantize_tokenwise_step(torch.randn(5, 64))
    try:
        with pytest.warns(UserWarning, match="sm_75"):
            out = groupwise.groupwise_matmul_triton(x, x_scale, codes, scales, 8, 32, out_dtype=torch.float32)
    finally:
        gpu_arch._dot_runs_on.cache_clear()
    expected = groupwise.groupwise_matmul_reference(x, x_scale, codes, scales, 8, 32, out_dtype=torch.float32)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_bf16_input_gradient_falls_back_below_sm80(monkeypatch):
    monkeypatch.setattr(gpu_arch, "device_arch", lambda device: (75, ARCHS[75].max_shared_bytes))
    gpu_arch._dot_runs_on.cache_clear()
    monkeypatch.setattr(matmul_grad_input, "_int8_grad_input_kernel", None)
    _, w, _, w_scale = _int8_operands()
    grad_y = torch.randn(7, 33).to(torch.bfloat16)
    try:
        with pytest.warns(UserWarning, match=r"^sm_75 GPU: bytetune's Triton GEMMs need sm_80\+"):
            out = llm_int8.int8_matmul_grad_input_triton(grad_y, w, w_scale)
    finally:
        gpu_arch._dot_runs_on.cache_clear()
    assert torch.equal(out, llm_int8.int8_matmul_grad_input_reference(grad_y, w, w_scale))


def test_no_fallback_from_sm80():
    gpu_arch._dot_runs_on.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert all(gpu_arch._dot_runs_on(capability) for capability in (80, 86, 89, 90))
    finally:
        gpu_arch._dot_runs_on.cache_clear()


# ------------------------------------------------------------------ Triton-version rules


def test_launchable_keeps_a_config_off_the_triton_release_it_spills_on():
    big = ARCHS[90].max_shared_bytes
    on_sm90 = gpu_arch.tile(BLOCK_SIZE=4096, num_warps=8, spills_on=(("3.8", 90),))
    assert gpu_arch.launchable(on_sm90, 90, big, lambda t: 0, version="3.8") == "spills under triton 3.8"
    assert gpu_arch.launchable(on_sm90, 90, big, lambda t: 0, version="3.9") is None
    assert gpu_arch.launchable(on_sm90, 86, ARCHS[86].max_shared_bytes, lambda t: 0, version="3.8") is None
    everywhere = gpu_arch.tile(BLOCK_SIZE=4096, num_warps=8, spills_on=(("3.6", 0),))
    for capability, arch in ARCHS.items():
        assert gpu_arch.launchable(everywhere, capability, arch.max_shared_bytes, lambda t: 0, version="3.6")
        assert gpu_arch.launchable(everywhere, capability, arch.max_shared_bytes, lambda t: 0, version="3.8") is None


def test_first_launchable_falls_back_where_the_first_choice_spills(monkeypatch):
    monkeypatch.setattr(gpu_arch, "triton_version", lambda: "3.8")
    spills = gpu_arch.tile(BLOCK_SIZE=4096, num_warps=8, spills_on=(("3.8", 90),))
    fallback = gpu_arch.tile(BLOCK_SIZE=4096, num_warps=16)
    assert gpu_arch.first_launchable([spills, fallback], 90, ARCHS[90].max_shared_bytes) is fallback
    assert gpu_arch.first_launchable([spills, fallback], 86, ARCHS[86].max_shared_bytes) is spills
    with pytest.raises(RuntimeError, match=r"no launch config fits sm_90 under triton 3\.8"):
        gpu_arch.first_launchable([spills], 90, ARCHS[90].max_shared_bytes)


def test_triton_version_is_the_installed_major_minor():
    major, minor = triton.__version__.split(".")[:2]
    assert gpu_arch.triton_version() == f"{major}.{minor}"


# Where the gate saw the first-choice element-wise config spill, and the warps the launch takes
# there instead: (triton, kernel, block size, capability) -> warps.
MEASURED_FALLBACKS = {
    ("3.6", "quantize_blockwise", 4096, 90): 16,
    ("3.8", "quantize_blockwise", 4096, 90): 16,
    ("3.6", "optimizer_update_adam", 256, 90): 4,
    ("3.6", "optimizer_update_adam", 512, 90): 8,
    ("3.6", "optimizer_update_momentum", 4096, 75): 16,
    ("3.8", "optimizer_update_momentum", 4096, 86): 16,
    ("3.8", "optimizer_update_momentum", 4096, 89): 16,
    ("3.8", "optimizer_update_momentum", 4096, 90): 16,
}


@pytest.mark.parametrize("version", ["3.6", "3.8", "3.9"])
def test_each_elementwise_launch_is_the_one_config_the_gate_checks(gate, monkeypatch, version):
    # The gate lists every config an element-wise launch may take; under each Triton release and
    # on each generation exactly one of them is launchable there, and it is the launch's pick.
    from bytetune.kernels import blockwise, optim_update

    monkeypatch.setattr(gpu_arch, "triton_version", lambda: version)
    rows: dict[tuple, list] = {}
    for launch in [*gate.blockwise_launches(), *gate.optim_update_launches()]:
        if launch.name.endswith("_optimizer_update_8bit_kernel"):
            kind = optim_update.UpdateKind(launch.constexprs["KIND"])
            kernel = f"optimizer_update_{kind.name.lower()}"
        else:
            kernel = launch.kernel.fn.__name__.strip("_").removesuffix("_kernel")
        rows.setdefault((kernel, launch.dtypes, launch.config["BLOCK_SIZE"]), []).append(launch)
    assert {key[0] for key in rows} >= {"quantize_blockwise", "dequantize_blockwise", "optimizer_update_adam"}
    device = torch.device("cuda", 0)
    for capability, arch in ARCHS.items():
        monkeypatch.setattr(gpu_arch, "device_arch", lambda device: (capability, arch.max_shared_bytes))
        for (kernel, _, block_size), launches in rows.items():
            if kernel.startswith("optimizer_update_"):
                kind = optim_update.UpdateKind[kernel.removeprefix("optimizer_update_").upper()]
                pick = optim_update.launch_tile(block_size, kind, device)
                first = optim_update.num_warps_for(block_size, kind)
            else:
                pick = blockwise.elementwise_tile(kernel, block_size, device)
                first = blockwise.num_warps_for(block_size)
            checked = [l.config for l in launches if l.blocked(capability, arch.max_shared_bytes) is None]
            assert checked == [pick], (kernel, block_size, capability, version)
            fallback = MEASURED_FALLBACKS.get((version, kernel, block_size, capability))
            assert pick.num_warps == (fallback or first), (kernel, block_size, capability, version)


@pytest.mark.parametrize("version,capability,block_k", [("3.6", 80, 32), ("3.6", 90, 64), ("3.8", 80, 64), ("3.9", 80, 64)])
def test_groupwise_fixed_tile_falls_back_where_it_spills(monkeypatch, version, capability, block_k):
    # BYTETUNE_AUTOTUNE=0 on a GPU launches one fixed tile; under triton 3.6 on sm_80 the
    # 64x64x64 one spilled with W4 weights, so a K tile of 32 takes its place there.
    from bytetune.kernels import groupwise

    monkeypatch.setattr(gpu_arch, "triton_version", lambda: version)
    pick = gpu_arch.first_launchable(groupwise.FIXED_GPU_TILES[64], capability, ARCHS[capability].max_shared_bytes)
    assert (pick["BLOCK_M"], pick["BLOCK_N"], pick["BLOCK_K"]) == (64, 64, block_k)
