"""Compile gate: every Triton kernel bytetune launches, compiled ahead of time for five GPU
generations on a machine without a GPU, with every config it may launch and the dtypes it is
called with.

Each compile mirrors a real launch's specialization because it goes through Triton's own launch
binder (the code ``kernel[grid](...)`` runs) with a CUDA backend of the target generation: an
integer argument equal to 1 (a unit stride) becomes a constexpr, pointers and integers divisible
by 16 get ``tt.divisibility``; ``MockTensor`` stands for a 16-byte-aligned tensor of a dtype.
Shared memory comes from ``.metadata.shared``, registers and spills (STACK) from
``cuobjdump -res-usage`` on the cubin.

A config is *launchable* on a generation when ``bytetune.kernels.gpu_arch.launchable`` (the rule
the kernels prune their menus with at launch, under the installed Triton version) keeps it, no
config the launch prefers is launchable there, and the kernel can run there at all. The gate
exits 1 when a launchable config fails to compile, needs more shared memory than that
generation has per block, or spills. The table goes to
bench/results/gpu_compile_triton-<version>.md: verdicts depend on the Triton release
(``make gpu-compile-versions`` runs the gate under each one the project supports).

Adding a kernel: write a function that yields :class:`Launch` rows (one per config x dtype, the
arguments built as the kernel's launch code builds them) and append it to ``REGISTRY``.

Run: ``make gpu-compile`` (or ``python bench/gpu_compile.py [--arch 86 90] [--subset]``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Compiling needs real JIT functions: under TRITON_INTERPRET=1 @triton.jit makes interpreter ones.
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: E402

from bytetune.kernels import (  # noqa: E402
    blockwise, fused_linear_ce, gpu_arch, groupwise, int8_experts, int8_head, llm_int8, optim_update,
)
from bytetune.kernels.gpu_arch import ARCHS, Tile  # noqa: E402
from bytetune.kernels.llm_int8 import matmul as llm_int8_matmul  # noqa: E402
from bytetune.kernels.llm_int8 import matmul_grad_input as llm_int8_grad_input  # noqa: E402
from bytetune.kernels.llm_int8 import outliers as llm_int8_outliers  # noqa: E402
from bytetune.kernels.llm_int8 import quantize_rows as llm_int8_quantize_rows  # noqa: E402

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
RESULTS = Path(__file__).resolve().parent / "results" / f"gpu_compile_triton-{triton.__version__}.md"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.uint8: "u8"}

# Shapes of a typical training launch: 8 x 512 tokens, hidden sizes multiples of 16. Unit
# strides are passed as 1, as a contiguous tensor's are, so they specialize the same way.
TOKENS, IN_FEATURES, OUT_FEATURES = 4096, 4096, 4096


def T(dtype: torch.dtype) -> MockTensor:
    return MockTensor(dtype)


@dataclasses.dataclass
class Launch:
    """One compile: a kernel, the config it launches with, and the launch's arguments."""

    kernel: object  # a triton JITFunction
    config: Tile
    dtypes: str  # what the row is called with, for the table
    args: tuple
    constexprs: dict
    # The estimate the launch-time prune uses (None: a fixed tile whose needs are small).
    shared_bytes: Callable[[Tile], int] | None = None
    min_capability: int = 0  # below it the kernel cannot run at all (the op falls back)
    ci: bool = False  # part of the fast subset the test suite runs
    # For a kernel with one config per shape: the configs its launch tries first
    # (gpu_arch.first_launchable); this one launches only where none of them may.
    preferred: tuple[Tile, ...] = ()

    def blocked(self, capability: int, max_shared_bytes: int) -> str | None:
        """None when this config may launch on the generation, else why not (the kernels' rule)."""
        if capability < self.min_capability:
            return f"kernel needs sm_{self.min_capability}+"
        estimate = self.shared_bytes or (lambda config: 0)
        for earlier in self.preferred:
            if gpu_arch.launchable(earlier, capability, max_shared_bytes, estimate) is None:
                return f"{earlier.label()} launches instead"
        return gpu_arch.launchable(self.config, capability, max_shared_bytes, estimate)

    @property
    def name(self) -> str:
        return f"{self.kernel.fn.__module__.removeprefix('bytetune.kernels.')}.{self.kernel.fn.__name__}"


# ---------------------------------------------------------------------------------- registry


def llm_int8_launches() -> Iterator[Launch]:
    m, n, k = TOKENS, OUT_FEATURES, IN_FEATURES
    for i, dtype in enumerate(FLOAT_DTYPES):
        for outliers in (False, True):
            for block_k in llm_int8.QUANTIZE_ROWS_BLOCK_K:
                yield Launch(
                    llm_int8_quantize_rows._quantize_rows_kernel, gpu_arch.tile(BLOCK_K=block_k), SHORT[dtype] + (" outliers" if outliers else ""),
                    (T(dtype), T(torch.int8), T(torch.float32), T(torch.int8), k, k, 1),
                    dict(HAS_OUTLIERS=outliers, BLOCK_K=block_k), ci=(i == 0 and outliers),
                )  # fmt: skip
        cfg = llm_int8.COLUMN_ABSMAX_TILE
        yield Launch(
            llm_int8_outliers._column_absmax_kernel, cfg, SHORT[dtype], (T(dtype), T(torch.float32), m, k, k, 1),
            cfg.kwargs, ci=i == 2,
        )  # fmt: skip
    matmul_tiles = [(c, False) for c in llm_int8.MATMUL_TILES] + [(llm_int8.FIXED_GPU_TILE, True)]
    for out_dtype in FLOAT_DTYPES:
        for cfg, fixed in matmul_tiles:
            yield Launch(
                llm_int8_matmul._int8_matmul_kernel, cfg, f"i8 -> {SHORT[out_dtype]}" + (" (fixed)" if fixed else ""),
                (T(torch.int8), T(torch.int8), T(torch.float32), T(torch.float32), T(torch.float32), T(out_dtype),
                 m, n, k, gpu_arch.m_bucket(m), k, 1, k, 1, n, 1),
                dict(HAS_BIAS=True, **cfg.kwargs),
                shared_bytes=functools.partial(llm_int8.matmul_shared_bytes, out_bytes=out_dtype.itemsize),
                min_capability=gpu_arch.DOT_MIN_CAPABILITY,
                ci=fixed and out_dtype == torch.bfloat16,
            )  # fmt: skip
    for grad_dtype in FLOAT_DTYPES:
        dot_in_fp32 = grad_dtype == torch.float32
        menu, fixed_tile = (
            (llm_int8.GRAD_INPUT_TILES_FP32, llm_int8.FIXED_GPU_TILE_FP32_GRAD) if dot_in_fp32
            else (llm_int8.GRAD_INPUT_TILES, llm_int8.FIXED_GPU_TILE)
        )  # fmt: skip
        rows = [(c, c == fixed_tile) for c in menu] + ([] if fixed_tile in menu else [(fixed_tile, True)])
        for cfg, fixed in rows:
            yield Launch(
                llm_int8_grad_input._int8_grad_input_kernel, cfg, f"{SHORT[grad_dtype]} x i8" + (" (fixed)" if fixed else ""),
                (T(grad_dtype), T(torch.int8), T(torch.float32), T(grad_dtype),
                 m, n, k, gpu_arch.m_bucket(m), n, 1, k, 1, k, 1),
                dict(DOT_IN_FP32=dot_in_fp32, DOT_PRECISION="ieee" if dot_in_fp32 else "tf32", **cfg.kwargs),
                shared_bytes=functools.partial(llm_int8.grad_input_shared_bytes, grad_bytes=grad_dtype.itemsize),
                min_capability=gpu_arch.DOT_MIN_CAPABILITY,
                ci=fixed and grad_dtype == torch.bfloat16,
            )  # fmt: skip


def groupwise_launches() -> Iterator[Launch]:
    m, n, k = TOKENS, OUT_FEATURES, IN_FEATURES
    for i, dtype in enumerate(FLOAT_DTYPES):
        for bits in groupwise.SUPPORTED_BITS:
            for group_size in groupwise.QUANTIZE_GROUP_SIZES:
                half_block = triton.next_power_of_2(group_size // 2)
                yield Launch(
                    groupwise._quantize_groupwise_kernel, gpu_arch.tile(HALF_BLOCK=half_block),
                    f"{SHORT[dtype]} -> w{bits} g{group_size}",
                    (T(dtype), T(torch.int8 if bits == 8 else torch.uint8), T(torch.float32), k,
                     groupwise.num_groups(k, group_size), k, k if bits == 8 else k // 2),
                    dict(QMAX=groupwise.qmax_for(bits), INT4=bits == 4, GROUP_SIZE=group_size, HALF_BLOCK=half_block),
                    ci=i == 2 and bits == 4 and group_size == 128,
                )  # fmt: skip
    group_size = groupwise.DEFAULT_GROUP_SIZE
    groups = groupwise.num_groups(k, group_size)
    # (activation dtype or None for int8 codes, weight bits, output dtype): W8A8 / W4A8 write
    # the activation dtype (the layer passes it); W8A16 / W4A16 write x's dtype.
    # Each activation dtype and each weight width at least once (the two choose different code).
    matmul_dtypes = [
        (None, 8, torch.bfloat16), (None, 4, torch.bfloat16), (None, 8, torch.float32),
        (torch.bfloat16, 8, torch.bfloat16), (torch.bfloat16, 4, torch.bfloat16), (torch.float16, 4, torch.float16),
        (torch.float32, 4, torch.float32),
    ]  # fmt: skip
    def menu_and_fixed(menu: list[Tile], menu_fp32: list[Tile], fp32: bool) -> list[tuple[Tile, bool]]:
        """(config, is a fixed tile) for each config this dtype may launch with, each once."""
        fixed = [groupwise.FIXED_GPU_TILE_FP32] if fp32 else [c for cs in groupwise.FIXED_GPU_TILES.values() for c in cs]
        configs = menu_fp32 if fp32 else menu
        return [(c, c in fixed) for c in configs] + [(c, True) for c in fixed if c not in configs]

    for x_dtype, bits, out_dtype in matmul_dtypes:
        x_int8 = x_dtype is None
        fp32 = x_dtype == torch.float32
        for cfg, fixed in menu_and_fixed(groupwise.MATMUL_TILES, groupwise.MATMUL_TILES_FP32, fp32):
            x_bytes = 1 if x_int8 else x_dtype.itemsize
            yield Launch(
                groupwise._groupwise_matmul_kernel, cfg,
                f"{'i8' if x_int8 else SHORT[x_dtype]} x w{bits} -> {SHORT[out_dtype]}" + (" (fixed)" if fixed else ""),
                (T(torch.int8 if x_int8 else x_dtype), T(torch.float32), T(torch.int8 if bits == 8 else torch.uint8),
                 T(torch.float32), T(torch.float32), T(out_dtype),
                 m, n, k, gpu_arch.m_bucket(m), groups, k, k if bits == 8 else k // 2, n),
                dict(GROUP_SIZE=group_size, INT4=bits == 4, X_INT8=x_int8, HAS_BIAS=True, FP32_DOT=fp32, **cfg.kwargs),
                shared_bytes=functools.partial(groupwise.matmul_shared_bytes, x_bytes=x_bytes),
                min_capability=gpu_arch.DOT_MIN_CAPABILITY,
                ci=cfg == groupwise.FIXED_GPU_TILES[64][0] and x_int8 and bits == 4,
            )  # fmt: skip
    for grad_dtype in FLOAT_DTYPES:
        fp32 = grad_dtype == torch.float32
        for bits in groupwise.SUPPORTED_BITS:
            for cfg, fixed in menu_and_fixed(groupwise.GRAD_INPUT_TILES, groupwise.GRAD_INPUT_TILES_FP32, fp32):
                yield Launch(
                    groupwise._groupwise_grad_input_kernel, cfg,
                    f"{SHORT[grad_dtype]} x w{bits}" + (" (fixed)" if fixed else ""),
                    (T(grad_dtype), T(torch.int8 if bits == 8 else torch.uint8), T(torch.float32), T(grad_dtype),
                     m, n, k, gpu_arch.m_bucket(m), groups, n, k if bits == 8 else k // 2, k),
                    dict(GROUP_SIZE=group_size, INT4=bits == 4, FP32_DOT=fp32, **cfg.kwargs),
                    shared_bytes=functools.partial(groupwise.grad_input_shared_bytes, grad_bytes=grad_dtype.itemsize),
                    min_capability=gpu_arch.DOT_MIN_CAPABILITY,
                    ci=cfg == groupwise.FIXED_GPU_TILES[64][0] and grad_dtype == torch.bfloat16 and bits == 4,
                )  # fmt: skip


# Element-wise kernels: one program per block, BLOCK_SIZE elements over num_warps warps. Every
# supported block size for fp32; the smallest, the default and the largest (the most elements
# per thread) for the 16-bit dtypes.
def _block_sizes(dtype: torch.dtype) -> tuple[int, ...]:
    sizes = blockwise.SUPPORTED_BLOCK_SIZES
    return sizes if dtype == torch.float32 else (sizes[0], blockwise.DEFAULT_BLOCK_SIZE, sizes[-1])


def blockwise_launches() -> Iterator[Launch]:
    numel = 1 << 20
    for dtype in FLOAT_DTYPES:
        for block_size in _block_sizes(dtype):
            ci = dtype == torch.bfloat16 and block_size == blockwise.DEFAULT_BLOCK_SIZE
            # Every config the launch may take (blockwise.elementwise_tile), each after the ones
            # it prefers.
            tiles = blockwise.elementwise_tiles("quantize_blockwise", block_size)
            for i, cfg in enumerate(tiles):
                yield Launch(
                    blockwise._quantize_blockwise_kernel, cfg, f"{SHORT[dtype]} -> u8",
                    (T(dtype), T(torch.uint8), T(torch.float32), T(torch.float32), numel), cfg.kwargs,
                    ci=ci and i == 0, preferred=tuple(tiles[:i]),
                )  # fmt: skip
            tiles = blockwise.elementwise_tiles("dequantize_blockwise", block_size)
            for i, cfg in enumerate(tiles):
                yield Launch(
                    blockwise._dequantize_blockwise_kernel, cfg, f"u8 -> {SHORT[dtype]}",
                    (T(torch.uint8), T(torch.float32), T(torch.float32), T(dtype), numel), cfg.kwargs,
                    ci=ci and i == 0, preferred=tuple(tiles[:i]),
                )  # fmt: skip


def optim_update_launches() -> Iterator[Launch]:
    # One launch updates every tensor of a param group: a table of their addresses (int64 rows)
    # and the owner of each block (int32); the pointers are loaded, so they carry no alignment.
    kinds = [(optim_update.UpdateKind.ADAM, False), (optim_update.UpdateKind.MOMENTUM, False),
             (optim_update.UpdateKind.MOMENTUM, True), (optim_update.UpdateKind.LION, False)]  # fmt: skip
    scalars = [0.5] * len(dataclasses.fields(optim_update.UpdateScalars))  # floats: never specialized
    book = (T(torch.float32), T(torch.float32))  # codes, midpoints
    for kind, nesterov in kinds:
        for dtype in FLOAT_DTYPES:
            sizes = _block_sizes(dtype) if kind == optim_update.UpdateKind.ADAM else (256, 4096)
            for block_size in sizes:
                tiles = optim_update.launch_tiles(block_size, kind)
                for i, cfg in enumerate(tiles):
                    yield Launch(
                        optim_update._optimizer_update_8bit_kernel, cfg,
                        f"{kind.name.lower()}{' nesterov' if nesterov else ''} {SHORT[dtype]}",
                        (T(torch.int64), T(torch.int32), *book, *book, *scalars),
                        dict(KIND=int(kind), NESTEROV=nesterov, BLOCK_SIZE=block_size,
                             PARAM_DTYPE=optim_update._TL_DTYPES[dtype]),
                        ci=i == 0 and kind == optim_update.UpdateKind.ADAM and dtype == torch.bfloat16 and block_size == 4096,
                        preferred=tuple(tiles[:i]),
                    )  # fmt: skip


def int8_head_launches() -> Iterator[Launch]:
    # The LM head's weight-only GEMM: 16-bit (or fp32) activations x int8 weight rows, BLOOM's
    # vocabulary as N.
    m, n, k = TOKENS, 250880, IN_FEATURES
    for name, config in int8_head.GPU_CONFIGS.items():
        cfg = gpu_arch.tile(**config)
        for dtype in ((torch.float32,) if name == "fp32" else (torch.bfloat16, torch.float16)):
            yield Launch(
                int8_head._weight_only_matmul_kernel, cfg, f"{SHORT[dtype]} x i8 ({name})",
                (T(dtype), T(torch.int8), T(torch.float32), T(dtype), m, n, k, k, 1, k, 1, n, 1),
                dict(DOT_IN_FP32=dtype == torch.float32, **cfg.kwargs),
                min_capability=gpu_arch.DOT_MIN_CAPABILITY, ci=name == "many_tokens" and dtype == torch.bfloat16,
            )  # fmt: skip


def fused_ce_launches() -> Iterator[Launch]:
    # The fused loss's per-row softmax / cross-entropy / gradient, in place over a chunk's logits.
    config = dict(fused_linear_ce.CE_GPU_CONFIG)
    cfg = gpu_arch.tile(num_warps=config.pop("num_warps"), **config)
    for dtype in FLOAT_DTYPES:
        yield Launch(
            fused_linear_ce._cross_entropy_rows_kernel, cfg, f"{SHORT[dtype]} logits",
            (T(dtype), 250880, T(torch.int64), T(torch.float32), 250880), cfg.kwargs,
            ci=dtype == torch.bfloat16,
        )  # fmt: skip


def int8_experts_launches() -> Iterator[Launch]:
    # The MoE experts' grouped int8 GEMM and its input gradient at Mixtral-8x22B's gate_up shape
    # (8 experts, N = 2 x 16384, K = 6144), 4096 routed rows; the tile table has rows/BLOCK_M + E
    # entries. Plus the per-expert column absmax that finds the outlier columns.
    experts, m, n, k, c = 8, TOKENS, 32768, 6144, 192
    absmax = int8_experts.COLUMN_ABSMAX_TILE
    for i, dtype in enumerate(FLOAT_DTYPES):
        yield Launch(
            int8_experts._expert_column_absmax_kernel, absmax, SHORT[dtype],
            (T(dtype), T(torch.int64), T(torch.float32), k, k, 1), absmax.kwargs, ci=i == 2,
        )  # fmt: skip
    for name, cfg in int8_experts.GROUPED_MATMUL_TILES.items():
        for out_dtype in ((torch.float32,) if name == "fp32" else (torch.float16, torch.bfloat16)):
            for outliers in (False, True):
                yield Launch(
                    int8_experts._grouped_int8_matmul_kernel, cfg,
                    f"i8 -> {SHORT[out_dtype]} ({name})" + (" outliers" if outliers else ""),
                    (T(torch.int8), T(torch.int8), T(torch.float32), T(torch.float32), T(out_dtype), T(torch.int64),
                     T(torch.int32), T(torch.int32), T(torch.int32), T(out_dtype),
                     n, k, c if outliers else 0, k, 1, n * k, k, 1, n, 1),
                    dict(HAS_OUTLIERS=outliers, DOT_IN_FP32=out_dtype == torch.float32, **cfg.kwargs),
                    shared_bytes=functools.partial(
                        int8_experts.grouped_matmul_shared_bytes, out_bytes=out_dtype.itemsize, x_bytes=out_dtype.itemsize
                    ),
                    min_capability=gpu_arch.DOT_MIN_CAPABILITY,
                    ci=name == "many_rows" and out_dtype == torch.bfloat16 and outliers,
                )  # fmt: skip
    for name, cfg in int8_experts.GROUPED_GRAD_TILES.items():
        for grad_dtype in ((torch.float32,) if name == "fp32" else (torch.float16, torch.bfloat16)):
            dot_in_fp32 = grad_dtype == torch.float32
            yield Launch(
                int8_experts._grouped_grad_input_kernel, cfg, f"{SHORT[grad_dtype]} x i8 ({name})",
                (T(grad_dtype), T(torch.int8), T(torch.float32), T(torch.int32), T(torch.int32), T(torch.int32),
                 T(grad_dtype), n, k, n, 1, n * k, k, 1, k, 1),
                dict(DOT_IN_FP32=dot_in_fp32, DOT_PRECISION="ieee" if dot_in_fp32 else "tf32", **cfg.kwargs),
                shared_bytes=functools.partial(int8_experts.grouped_grad_shared_bytes, grad_bytes=grad_dtype.itemsize),
                min_capability=gpu_arch.DOT_MIN_CAPABILITY,
                ci=name == "many_rows" and grad_dtype == torch.bfloat16,
            )  # fmt: skip


REGISTRY: list[Callable[[], Iterator[Launch]]] = [
    llm_int8_launches,
    groupwise_launches,
    blockwise_launches,
    optim_update_launches,
    int8_head_launches,
    fused_ce_launches,
    int8_experts_launches,
]


def all_launches() -> list[Launch]:
    return [launch for make in REGISTRY for launch in make()]


# ---------------------------------------------------------------------------------- compiling


@dataclasses.dataclass
class Result:
    compiled: bool
    error: str = ""
    shared: int = 0
    registers: int = 0
    spill: int = 0
    seconds: float = 0.0
    skipped: bool = False  # not launchable there, and not compiled (run with --all to compile it)


def compile_launch(launch: Launch, capability: int) -> Result:
    """Compile one launch for one generation, as ``kernel[grid](*args, **constexprs)`` would."""
    start = time.perf_counter()
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    fn = launch.kernel
    kwargs = dict(launch.constexprs, num_warps=launch.config.num_warps, num_stages=launch.config.num_stages)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    with tempfile.TemporaryFile(mode="w+") as stderr_copy:
        # MLIR prints its diagnostics (pages of IR) on fd 2: keep the first error line only.
        saved = os.dup(2)
        os.dup2(stderr_copy.fileno(), 2)
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - every failure is a row in the table
            os.dup2(saved, 2)
            stderr_copy.seek(0)
            lines = [ln.strip() for ln in stderr_copy if " error: " in ln or ln.startswith("error")]
            detail = lines[0].split(" error: ", 1)[-1] if lines else str(error).splitlines()[0]
            return Result(False, f"{type(error).__name__}: {detail}"[:160], seconds=time.perf_counter() - start)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    registers, spill = cubin_resources(compiled.asm["cubin"])
    return Result(True, "", compiled.metadata.shared, registers, spill, time.perf_counter() - start)


def cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(NVIDIA_BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return int(usage.group(1)), int(usage.group(2))


_LAUNCHES: list[Launch] = []


def _init_worker(launches: list[Launch], cache_dir: str) -> None:
    global _LAUNCHES
    _LAUNCHES = launches
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _compile_task(task: tuple[int, int]) -> Result:
    index, capability = task
    return compile_launch(_LAUNCHES[index], capability)


@dataclasses.dataclass
class Row:
    launch: Launch
    capability: int
    result: Result
    blocked: str | None  # why it may not launch there; None = launchable

    @property
    def failure(self) -> str | None:
        """Why this row fails the gate (only launchable rows can)."""
        if self.blocked is not None:
            return None
        if not self.result.compiled:
            return "does not compile"
        if self.result.shared > ARCHS[self.capability].max_shared_bytes:
            return "over the shared-memory limit"
        if self.result.spill:
            return "spills"
        return None


def run_gate(
    launches: list[Launch], capabilities: list[int], jobs: int, cache_dir: str | None = None, compile_all: bool = False
) -> list[Row]:
    """Compile every launchable (launch, generation) pair; with ``compile_all`` the others too."""
    pairs = [(i, cap) for i in range(len(launches)) for cap in capabilities]
    blocked = {(i, cap): launches[i].blocked(cap, ARCHS[cap].max_shared_bytes) for i, cap in pairs}
    tasks = [pair for pair in pairs if compile_all or blocked[pair] is None]
    with tempfile.TemporaryDirectory(prefix="bytetune_gate_cache_") as fresh:
        cache = cache_dir or fresh
        if jobs <= 1:
            _init_worker(launches, cache)
            results = [_compile_task(t) for t in tasks]
        else:
            # fork: the workers inherit the launches (JIT functions do not pickle).
            ctx = __import__("multiprocessing").get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(jobs, ctx, _init_worker, (launches, cache)) as pool:
                results = []
                for done, result in enumerate(pool.map(_compile_task, tasks, chunksize=1), 1):
                    results.append(result)
                    if done % 50 == 0:
                        print(f"{done}/{len(tasks)} compiled", file=sys.stderr, flush=True)
    by_pair = dict(zip(tasks, results))
    return [
        Row(launches[i], cap, by_pair.get((i, cap), Result(False, skipped=True)), blocked[(i, cap)])
        for i, cap in pairs
    ]


# ---------------------------------------------------------------------------------- report


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def render(rows: list[Row], capabilities: list[int], wall_s: float, jobs: int, scope: str = "") -> str:
    launches: dict[int, list[Row]] = {}
    for row in rows:
        launches.setdefault(id(row.launch), []).append(row)
    compiled = sum(r.result.compiled for r in rows)
    attempted = sum(not r.result.skipped for r in rows)
    launchable = [r for r in rows if r.blocked is None]
    failures = [r for r in rows if r.failure]
    lines = [
        "# Compile gate: every Triton kernel x config x dtype x GPU generation",
        "",
        f"Generated by `bench/gpu_compile.py` on {datetime.date.today()} with **triton {triton.__version__}** "
        f"(torch {torch.__version__}), ptxas from the triton wheel, no GPU. Wall time {wall_s:.0f} s with {jobs} worker processes on "
        f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the end; fresh Triton cache).",
        "",
        f"Scope: {scope or 'every kernel in the registry'}.",
        "",
        f"**{len(rows)} cells** ({len(launches)} kernel x config x dtype rows x {len(capabilities)} generations), "
        f"**{len(launchable)} launchable**, of which **{len(failures)} fail** (do not compile, exceed the "
        f"generation's shared memory per block, or spill). {attempted} compiled ({compiled} succeeded); cells "
        "that cannot launch are compiled only with `--all`.",
        "",
        "Per-block shared memory limits: " + ", ".join(f"sm_{c} {_kib(ARCHS[c].max_shared_bytes)} KiB" for c in capabilities) + ".",
        "Cell: `shared KiB / registers / spill bytes`; `-` = not launchable there (reason in the notes column), "
        "`FAIL` = a launchable config that fails the gate. Shared `est` is the estimate the launch-time prune uses.",
        "",
        "| kernel | config | dtypes | est KiB | " + " | ".join(f"sm_{c}" for c in capabilities) + " | notes |",
        "|---|---|---|---|" + "---|" * len(capabilities) + "---|",
    ]
    for group in launches.values():
        launch = group[0].launch
        cells, notes = [], []
        for row in group:
            r = row.result
            figure = f"{_kib(r.shared)} / {r.registers} / {r.spill}" if r.compiled else "no compile"
            if r.skipped:
                figure = "not compiled"
            if row.failure:
                cells.append(f"**FAIL** {figure}")
                notes.append(f"sm_{row.capability}: {row.failure}" + (f" ({r.error})" if r.error else ""))
            elif row.blocked is not None:
                cells.append(f"- ({figure})")
                notes.append(f"sm_{row.capability}: {row.blocked}" + ("" if r.compiled or r.skipped else f"; {r.error}"))
            else:
                cells.append(figure)
        estimate = _kib(launch.shared_bytes(launch.config)) if launch.shared_bytes else ""
        lines.append(
            f"| {launch.name} | {launch.config.label()} | {launch.dtypes} | {estimate} | " + " | ".join(cells)
            + " | " + "; ".join(_merge_notes(notes)) + " |"
        )
    return "\n".join(lines) + "\n"


def _merge_notes(notes: list[str]) -> list[str]:
    """'sm_75: x; sm_80: x' -> 'sm_75, sm_80: x'."""
    by_text: dict[str, list[str]] = {}
    for note in notes:
        arch, text = note.split(": ", 1)
        by_text.setdefault(text, []).append(arch)
    return [f"{', '.join(archs)}: {text}" for text, archs in by_text.items()]


# ---------------------------------------------------------------------------------- on a real card


def verify_on_device(launches: list[Launch], jobs: int) -> int:
    """On a CUDA machine: compile each launchable row twice, ahead of time as the gate does and
    through Triton's own launch path for the card (``warmup``), load the latter on the card and
    compare its shared memory, registers and spills (the driver's figures) with the gate's. Also
    compares the card's shared memory per block with :data:`gpu_arch.ARCHS`. Returns 1 on any
    disagreement or a launchable config that does not load."""
    # The gate's worker processes fork before this process touches CUDA: nvidia-smi names the
    # generation without initializing it.
    query = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader", "-i", "0"]
    capability = int(subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip().replace(".", ""))
    if capability not in ARCHS:
        print(f"sm_{capability} is not in gpu_arch.ARCHS: the gate does not cover this card")
        return 1
    rows = [r for r in run_gate(launches, [capability], jobs) if r.blocked is None]
    props = torch.cuda.get_device_properties(0)
    device_shared = int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))
    problems = []
    print(f"# Compile gate vs {props.name} (sm_{capability}), triton {triton.__version__}\n")
    table_shared = ARCHS[capability].max_shared_bytes
    print(f"shared memory per block: gpu_arch.ARCHS says {table_shared} B, the card {device_shared} B\n")
    if table_shared != device_shared:
        problems.append("shared-memory limit")
    print("| kernel | config | dtypes | gate shared / regs / spill | card shared / regs / spill | |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bytetune_card_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh compile, not the gate's cubin
        for row in rows:
            launch, gate = row.launch, row.result
            kwargs = dict(launch.constexprs, num_warps=launch.config.num_warps, num_stages=launch.config.num_stages)
            try:
                kernel = launch.kernel.warmup(*launch.args, grid=(1,), **kwargs)
                kernel._init_handles()  # loads it: raises OutOfResources past the card's limits
                # Triton reports the local (spill) memory in 4-byte words (driver.c divides the
                # driver's CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES by 4); cuobjdump's STACK is bytes.
                card = (kernel.metadata.shared, kernel.n_regs, kernel.n_spills * 4)
                verdict = "ok" if card == (gate.shared, gate.registers, gate.spill) else "DIFFERS"
            except Exception as error:  # noqa: BLE001 - a row of the report
                card, verdict = None, f"FAILS: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            if verdict != "ok":
                problems.append(f"{launch.name} {launch.config.label()} {launch.dtypes}")
            predicted = f"{gate.shared} / {gate.registers} / {gate.spill}" if gate.compiled else "no compile"
            measured = " / ".join(map(str, card)) if card else "-"
            print(f"| {launch.name} | {launch.config.label()} | {launch.dtypes} | {predicted} | {measured} | {verdict} |")
    print(f"\n{len(rows)} launchable rows checked on the card, {len(problems)} problems" +
          (": " + "; ".join(problems) if problems else ""))  # fmt: skip
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(ARCHS), help="capabilities, e.g. 86 90")
    parser.add_argument("--subset", action="store_true", help="only the fast CI subset (one config per kernel)")
    parser.add_argument("--only", default="", help="only kernels whose name contains one of these (comma-separated)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--all", action="store_true", help="also compile the cells that cannot launch")
    parser.add_argument("--output", type=Path, default=RESULTS, help="markdown table ('-' = stdout only)")
    parser.add_argument(
        "--device", action="store_true",
        help="on a CUDA machine: compare the gate's figures for this card's generation with the card's own",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = [c for c in args.arch if c not in ARCHS]
    if unknown:
        parser.error(f"unknown capability {unknown}; known: {sorted(ARCHS)}")
    if not (NVIDIA_BIN / "ptxas").exists():
        print(f"no ptxas in {NVIDIA_BIN}: this triton wheel cannot compile for NVIDIA GPUs", file=sys.stderr)
        return 2
    launches = [
        launch for launch in all_launches()
        if (launch.ci or not args.subset) and any(part in launch.name for part in args.only.split(","))
    ]  # fmt: skip
    if args.device:
        return verify_on_device(launches, args.jobs)
    start = time.perf_counter()
    rows = run_gate(launches, args.arch, args.jobs, compile_all=args.all)
    wall = time.perf_counter() - start
    scope = " ".join(
        part for part in (
            "the CI subset (--subset)" if args.subset else "",
            f"only kernels matching {args.only!r} (--only)" if args.only else "",
        ) if part
    )  # fmt: skip
    table = render(rows, args.arch, wall, args.jobs, scope)
    if str(args.output) != "-":
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table)
    failures = [r for r in rows if r.failure]
    for row in failures:
        print(f"FAIL {row.launch.name} {row.launch.config.label()} {row.launch.dtypes} sm_{row.capability}: "
              f"{row.failure} {row.result.error}".rstrip())  # fmt: skip
    if any(row.failure == "spills" for row in failures):
        print(f"a config that spills only under some Triton releases: add ({gpu_arch.triton_version()!r}, "
              "<capability>) to its Tile.spills_on and give the launch a config to fall back to")
    print(f"{len(rows)} cells, {sum(r.blocked is None for r in rows)} launchable, {len(failures)} failing; "
          f"{sum(not r.result.skipped for r in rows)} compiled in {wall:.0f} s"
          + ("" if str(args.output) == "-" else f"; table in {args.output}"))  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
