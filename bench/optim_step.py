"""Optimizer step time and state bytes: bytetune Adam8bit vs torch AdamW (foreach, fused) and,
when installed, bitsandbytes Adam8bit and torchao AdamW8bit, all measured in this run.

On CUDA it also prints achieved GB/s (bytes read + written per step / step time) against a
device-to-device copy measured in the same run (goal: >= 85 % of copy bandwidth).

Usage: python bench/optim_step.py [--sizes 1M,16M,64M] [--steps N]
Default sizes: 1M,16M,64M on CUDA; 1M,4M on CPU (the CPU path is the PyTorch reference).
"""

from __future__ import annotations

import argparse
import time

import torch

from bytetune.optim import Adam8bit, state_bytes_per_param


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peers(device):
    peers = {
        "bytetune Adam8bit": lambda ps: Adam8bit(ps, lr=1e-3),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    }
    if device.type == "cuda" or hasattr(torch.optim.AdamW, "fused"):
        peers["torch AdamW fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)
    try:
        import bitsandbytes as bnb

        peers["bitsandbytes Adam8bit"] = lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3)
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


def time_steps(make_opt, numel, device, steps):
    gen = torch.Generator(device="cpu").manual_seed(0)
    param = torch.nn.Parameter(torch.randn(numel, generator=gen).to(device))
    param.grad = (torch.randn(numel, generator=gen) * 1e-2).to(device)
    opt = make_opt([param])
    for _ in range(3):
        opt.step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    _sync(device)
    return (time.perf_counter() - start) / steps, _state_bytes(opt)


def copy_bandwidth(numel, device, steps):
    src = torch.empty(numel * 4, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        dst.copy_(src)
    _sync(device)
    return 2 * src.nbytes * steps / (time.perf_counter() - start) / 1e9


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(text.rstrip("KM")) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.sizes or ("1M,16M,64M" if device.type == "cuda" else "1M,4M")
    steps = args.steps or (50 if device.type == "cuda" else 5)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# optimizer step, fp32 params, device: {name}, {steps} timed steps")
    peers = _peers(device)
    for size_text in sizes.split(","):
        numel = parse_size(size_text)
        copy_gbs = copy_bandwidth(numel, device, steps) if device.type == "cuda" else None
        print(f"\n## {size_text} elements" + (f"; device copy {copy_gbs:.0f} GB/s" if copy_gbs else ""))
        header = f"{'optimizer':<24}{'ms/step':>10}{'state B/param':>15}{'time / bytetune':>17}"
        print(header + (f"{'GB/s':>8}{'% of copy':>11}" if copy_gbs else ""))
        baseline = None
        for peer, make_opt in peers.items():
            try:
                seconds, state_bytes = time_steps(make_opt, numel, device, steps)
            except Exception as exc:  # noqa: BLE001 - a peer failing on this device is reported, not fatal
                print(f"{peer:<24}  failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                continue
            baseline = baseline or seconds
            row = f"{peer:<24}{seconds * 1e3:>10.3f}{state_bytes:>15.3f}{seconds / baseline:>16.2f}x"
            if copy_gbs:
                # param read + write, grad read, states read + write.
                moved = numel * (4 + 4 + 4) + 2 * state_bytes * numel
                gbs = moved / seconds / 1e9
                row += f"{gbs:>8.0f}{100 * gbs / copy_gbs:>10.0f}%"
            print(row)


if __name__ == "__main__":
    main()
