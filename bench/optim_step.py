"""Optimizer step time, state bytes and kernel launches: bytetune AdamW8bit against bitsandbytes'
and torchao's AdamW8bit (and torch AdamW for scale), all measured in this run, interleaved.

Two parameter lists:
- ``lora``: the trainable tensors of SmolLM2-135M with LoRA r=16 on all 7 linears of its 30
  blocks (A is [16, in], B is [out, 16]; fp32): 420 tensors, 4.9M elements, 60 of them under
  the 8-bit size threshold;
- ``1M``: one tensor of 1M elements.

Timing: ``--rounds`` rounds, each timing ``--steps`` steps of every optimizer in turn, so load
from other processes hits all of them alike; prints the median ms/step and the min-max over the
rounds, plus CPU time of this process per step (less sensitive to a shared machine).

Launches per step (``--count-launches``): the GPU path's Triton launches and aten ops per
bytetune step, counted on CPU by sending CPU tensors through the Triton kernels in the
interpreter (sets TRITON_INTERPRET=1 and BYTETUNE_FORCE_TRITON=1). The interpreter needs ~0.1 s
per program, so this counts on the same list at LoRA rank 1 with min_8bit_size scaled by 1/16
(same tensors, same 8/32-bit split) and block_size 4096: launches do not depend on sizes.

Usage: python bench/optim_step.py [--lists lora,1M] [--steps N] [--rounds R] [--threads T] [--peers P,Q]
       python bench/optim_step.py --count-launches
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# SmolLM2-135M linears per block as (out, in): q, k, v, o, gate, up, down.
SMOLLM2_LINEARS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SMOLLM2_BLOCKS = 30


def lora_shapes(rank: int = 16) -> list[tuple[int, int]]:
    return [
        shape
        for _ in range(SMOLLM2_BLOCKS)
        for out_features, in_features in SMOLLM2_LINEARS
        for shape in ((rank, in_features), (out_features, rank))
    ]


def make_params(shapes, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        param.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        params.append(param)
    return params


def _peers():
    import torch

    from bytetune.optim import AdamW8bit

    peers = {
        "bytetune AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    }
    try:
        import bitsandbytes as bnb

        peers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        print(f"# bitsandbytes unavailable: {type(exc).__name__}: {exc}")
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        peers["torchao AdamW8bit"] = lambda ps: AoAdamW8bit(ps, lr=1e-3)
    except Exception as exc:  # noqa: BLE001
        print(f"# torchao unavailable: {type(exc).__name__}: {exc}")
    return peers


def _state_bytes(opt) -> float:
    """Bytes of all tensors in the optimizer state per parameter element (tensor subclasses such
    as torchao's count their inner storage through nbytes of their flattened components)."""
    import torch

    total, n = 0, 0
    for group in opt.param_groups:
        for p in group["params"]:
            n += p.numel()
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and key != "step":
                    if hasattr(value, "__tensor_flatten__"):
                        names, _ = value.__tensor_flatten__()
                        total += sum(getattr(value, name).nbytes for name in names)
                    else:
                        total += value.nbytes
    return total / n


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_list(name, shapes, device, steps, rounds, only=None):
    optimizers, failed = {}, {}
    for peer, make_opt in _peers().items():
        if only and not any(peer.startswith(prefix) for prefix in only):
            continue
        try:
            opt = make_opt(make_params(shapes, device))
            for _ in range(2):  # state allocation, then one warm step
                opt.step()
            optimizers[peer] = opt
        except Exception as exc:  # noqa: BLE001 - a peer failing here is reported, not fatal
            failed[peer] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    wall = {peer: [] for peer in optimizers}
    cpu = {peer: [] for peer in optimizers}
    for _ in range(rounds):
        for peer, opt in optimizers.items():
            _sync(device)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                opt.step()
            _sync(device)
            wall[peer].append((time.perf_counter() - start_wall) / steps * 1e3)
            cpu[peer].append((time.process_time() - start_cpu) / steps * 1e3)
    numel = sum(p.numel() for p in next(iter(optimizers.values())).param_groups[0]["params"])
    print(f"\n## {name}: {len(shapes)} tensors, {numel / 1e6:.2f}M elements ({rounds} rounds x {steps} steps)")
    print(f"{'optimizer':<24}{'ms/step':>10}{'min-max':>16}{'cpu ms/step':>13}{'state B/param':>15}{'vs bitsandbytes':>17}")
    reference = statistics.median(wall["bitsandbytes AdamW8bit"]) if "bitsandbytes AdamW8bit" in wall else None
    for peer, opt in optimizers.items():
        median = statistics.median(wall[peer])
        spread = f"{min(wall[peer]):.1f}-{max(wall[peer]):.1f}"
        ratio = f"{median / reference:>16.2f}x" if reference else f"{'-':>17}"
        print(
            f"{peer:<24}{median:>10.1f}{spread:>16}{statistics.median(cpu[peer]):>13.1f}"
            f"{_state_bytes(opt):>15.3f}{ratio}"
        )
    for peer, why in failed.items():
        print(f"{peer:<24}  failed: {why}")


def count_launches() -> None:
    """Triton launches and aten ops of one bytetune AdamW8bit step on the GPU path (see module doc)."""
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["BYTETUNE_FORCE_TRITON"] = "1"
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bytetune.kernels import optim_update
    from bytetune.optim import AdamW8bit

    class CountOps(TorchDispatchMode):
        """Counts aten ops that touch tensor data (views and metadata queries launch nothing),
        except inside a Triton launch (the interpreter's own copies of the arguments)."""

        def __init__(self):
            super().__init__()
            self.ops = 0
            self.paused = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.paused and not func.is_view and func.__name__.split(".")[0] not in ("detach", "alias"):
                self.ops += 1
            return func(*args, **(kwargs or {}))

    counter = CountOps()
    kernel = optim_update._optimizer_update_8bit_kernel

    class PausingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counter.paused = True
                try:
                    return kernel[grid](*args, **kwargs)
                finally:
                    counter.paused = False

            return launch

    optim_update._optimizer_update_8bit_kernel = PausingKernel()

    params = make_params(lora_shapes(rank=1), torch.device("cpu"))
    # Fewer, larger blocks: the same launches, fewer interpreted programs.
    opt = AdamW8bit(params, lr=1e-3, min_8bit_size=4096 // 16, block_size=4096)
    os.environ["BYTETUNE_FORCE_TRITON"] = "0"
    opt.step()  # state allocation, on the reference path
    os.environ["BYTETUNE_FORCE_TRITON"] = "1"
    n_8bit = sum(1 for p in params if opt.state[p]["state1"].dtype == torch.uint8)
    before = optim_update.launch_count["optimizer_update_8bit"]
    with counter:
        opt.step()
    launches = optim_update.launch_count["optimizer_update_8bit"] - before
    print(f"# GPU path of one bytetune AdamW8bit step on the LoRA list ({len(params)} tensors, {n_8bit} with 8-bit states)")
    print(f"Triton launches per step: {launches}")
    print(f"other aten ops per step (each one or a few CUDA launches; the 32-bit small tensors, the table): {counter.ops}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lists", default="lora,1M")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--count-launches", action="store_true")
    parser.add_argument(
        "--peers", default=None, help="comma-separated name prefixes, e.g. bytetune,bitsandbytes (default: all; "
        "torchao compiles one graph per tensor shape on first use, minutes on a small CPU)",
    )
    args = parser.parse_args()
    if args.count_launches:
        count_launches()
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps or (50 if device.type == "cuda" else 2)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# optimizer step, fp32 params, {where}, python {sys.version.split()[0]}, torch {torch.__version__}")
    lists = {"lora": lora_shapes(), "1M": [(1 << 20,)]}
    for name in args.lists.split(","):
        time_list(name, lists[name], device, steps, args.rounds, args.peers.split(",") if args.peers else None)


if __name__ == "__main__":
    main()
