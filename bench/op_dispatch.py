"""What a call through torch.library costs on CPU, and what the quantized layers pay per call.

Part 1 (``--part mechanisms``) times one trivial op (``x * 2`` on a [4, 8] tensor, forward and
backward) four ways: the plain function, a plain ``torch.autograd.Function``, an op declared with
``torch.library.Library(...).define`` whose ``Autograd`` kernel is such a Function (how
bytetune.kernels._ops registers the layer ops), the same op with
``torch.library.register_autograd``, and ``torch.library.custom_op``. The differences are the
per-call dispatch overheads.

Part 2 (``--part layers``) times Int8Linear and GroupQuantLinear forward + backward on tiny shapes
(4 tokens, 64 x 64), where the arithmetic is a few microseconds and the per-call overhead shows.
It measures whichever bytetune is importable, so the same command compares two trees:

    python bench/op_dispatch.py
    PYTHONPATH=/path/to/other/tree python bench/op_dispatch.py --part layers

Each figure is the median over ``--rounds`` rounds of ``--calls`` calls, one torch thread: wall
time and the calling thread's CPU time (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_us(fn, calls: int, rounds: int) -> tuple[float, float]:
    """(wall, this thread's CPU time) per call in microseconds, medians over the rounds. With one
    torch thread the op runs on the calling thread, so its CPU time leaves out the time other
    processes of a shared machine held the core."""
    for _ in range(max(1, calls // 10)):
        fn()
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        walls.append((time.perf_counter() - wall) / calls * 1e6)
        cpus.append((time.thread_time() - cpu) / calls * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def mechanisms(calls: int, rounds: int) -> list[tuple[str, float]]:
    x = torch.randn(4, 8, requires_grad=True)

    def body(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    class Plain(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return body(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    lib = torch.library.Library("bench_dispatch", "DEF")
    lib.define("via_function(Tensor x) -> Tensor")
    lib.define("via_register_autograd(Tensor x) -> Tensor")
    for name in ("via_function", "via_register_autograd"):
        lib.impl(name, body, "CPU")
        torch.library.register_fake(f"bench_dispatch::{name}", lambda x: torch.empty_like(x), lib=lib)
    via_function = torch.ops.bench_dispatch.via_function.default

    class Below(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            with torch._C._AutoDispatchBelowAutograd():
                return via_function(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    lib.impl("via_function", Below.apply, "Autograd")
    torch.library.register_autograd(
        "bench_dispatch::via_register_autograd",
        lambda ctx, grad: grad * 2,
        setup_context=lambda ctx, inputs, output: None,
        lib=lib,
    )
    via_register_autograd = torch.ops.bench_dispatch.via_register_autograd.default
    custom = torch.library.custom_op("bench_dispatch::custom", body, mutates_args=())
    custom.register_fake(lambda x: torch.empty_like(x))
    custom.register_autograd(lambda ctx, grad: grad * 2, setup_context=lambda ctx, inputs, output: None)

    cases = [
        ("plain function (no op)", body),
        ("autograd.Function", Plain.apply),
        ("Library.define + Autograd kernel = Function (bytetune)", via_function),
        ("Library.define + register_autograd", via_register_autograd),
        ("torch.library.custom_op", custom),
    ]
    return [(name, _median_us(lambda f=f: f(x).sum().backward(), calls, rounds)) for name, f in cases]


def layers(calls: int, rounds: int) -> list[tuple[str, float]]:
    from torch import nn

    from bytetune import GroupQuantLinear, Int8Linear

    torch.manual_seed(0)
    x = torch.randn(4, 64, requires_grad=True)
    int8 = Int8Linear.from_linear(nn.Linear(64, 64), threshold=6.0)
    group = GroupQuantLinear.from_linear(nn.Linear(64, 64), bits=8, group_size=32, act_bits=8)
    rows = []
    for name, layer in (("Int8Linear 4 x 64 -> 64", int8), ("GroupQuantLinear W8A8 4 x 64 -> 64", group)):
        rows.append((f"{name} forward", _median_us(lambda m=layer: m(x), calls, rounds)))
        rows.append((f"{name} forward + backward", _median_us(lambda m=layer: m(x).sum().backward(), calls, rounds)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["mechanisms", "layers", "both"], default="both")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    if args.part in ("mechanisms", "both"):
        rows += mechanisms(args.calls, args.rounds)
    if args.part in ("layers", "both"):
        rows += layers(args.calls, args.rounds)
    print("| case | wall us per call (median) | thread CPU us per call (median) |\n|---|---|---|")
    for name, (wall, cpu) in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
