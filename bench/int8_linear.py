"""Int8Linear vs a 16-bit nn.Linear (and bitsandbytes Linear8bitLt when installed).

Times forward and forward + backward (input gradient only: every weight is frozen, as in LoRA
fine-tuning) for each (tokens, in_features x out_features) case. All peers are measured in the
same run; the table reports milliseconds and speed relative to the 16-bit nn.Linear
(``t_linear / t_peer``: 1.00x = as fast, 0.50x = twice as slow).

Activations are normal, clamped below the threshold, with ~0.1 % outlier columns (|x| ~ 10-20
in every token of those columns), so threshold 6.0 exercises the decomposition and threshold 0
is pure int8.

    python bench/int8_linear.py            # CUDA: full sizes; CPU: large dims / 8
    python bench/int8_linear.py --small    # small sizes on any device
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bytetune.quant_layers import Int8Linear

FULL_TOKENS = [1, 16, 4096]
FULL_SHAPES = [(4096, 4096), (4096, 16384), (16384, 4096)]  # (in_features, out_features)
# --small (and any CPU run): the same grid with the large dimensions divided by 8 (16 for tokens,
# so a CPU run stays within a few minutes).
SMALL_TOKENS = [1, 16, 256]
SMALL_SHAPES = [(512, 512), (512, 2048), (2048, 512)]
OUTLIER_FRACTION = 0.001


def _activations(tokens, in_features, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=gen).clamp_(-5.5, 5.5)
    n_outliers = max(1, round(OUTLIER_FRACTION * in_features))
    cols = torch.randperm(in_features, generator=gen)[:n_outliers]
    signs = torch.where(torch.rand(n_outliers, generator=gen) < 0.5, -1.0, 1.0)
    x[:, cols] = signs * (10.0 + 10.0 * torch.rand(tokens, n_outliers, generator=gen))
    return x.to(device, dtype)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, reps, warmup):
    # Warm-up also absorbs Triton compilation and autotuning on the first calls.
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _bitsandbytes_layer(linear, threshold, device):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        has_fp16_weights=False, threshold=threshold,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)  # bitsandbytes quantizes the weight when it is moved


def _peers(linear, device, with_bnb):
    peers = {"nn.Linear": linear}
    for threshold in (0.0, 6.0):
        peers[f"Int8Linear t={threshold:g}"] = Int8Linear.from_linear(linear, threshold=threshold)
    if with_bnb:
        for threshold in (0.0, 6.0):
            layer = _bitsandbytes_layer(linear, threshold, device)
            if layer is not None:
                peers[f"bnb Linear8bitLt t={threshold:g}"] = layer
    for layer in peers.values():
        layer.requires_grad_(False)
    return peers


def run(tokens_list, shapes, dtype, device, reps, warmup, with_bnb):
    """Yields (tokens, shape, mode, {peer: median ms}) as each case is measured."""
    for in_features, out_features in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features, bias=True).to(device, dtype)
        peers = _peers(linear, device, with_bnb)
        for tokens in tokens_list:
            x = _activations(tokens, in_features, dtype, device)
            x_grad = x.clone().requires_grad_(True)
            grad_y = torch.randn(tokens, out_features, device=device, dtype=dtype)
            for mode in ("forward", "forward+backward"):
                times = {}
                for name, layer in peers.items():
                    if mode == "forward":
                        def step(layer=layer):
                            with torch.no_grad():
                                layer(x)
                    else:
                        def step(layer=layer):
                            layer(x_grad).backward(grad_y)
                            x_grad.grad = None
                    times[name] = _median_ms(step, device, reps, warmup)
                yield tokens, f"{in_features}x{out_features}", mode, times
        del peers, linear
        if device.type == "cuda":
            torch.cuda.empty_cache()


def format_header(names, dtype, device):
    header = f"{'tokens':>6} {'in x out':>11} {'mode':>16} | " + " | ".join(f"{n:>22}" for n in names)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    title = (
        f"Int8Linear bench: {device_name}, activations {dtype}, median ms and speed vs nn.Linear "
        "(t_linear / t; >1 = faster)"
    )
    return "\n".join([title, header, "-" * len(header)])


def format_row(tokens, shape, mode, times):
    base = times["nn.Linear"]
    cells = [f"{t:9.3f} ms {base / t:5.2f}x" for t in times.values()]
    return f"{tokens:>6} {shape:>11} {mode:>16} | " + " | ".join(f"{c:>22}" for c in cells)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="large dims / 8 (default on CPU)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 CUDA, 3 CPU)")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even when installed")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    small = args.small or device.type == "cpu"
    tokens_list, shapes = (SMALL_TOKENS, SMALL_SHAPES) if small else (FULL_TOKENS, FULL_SHAPES)
    reps = args.reps or (20 if device.type == "cuda" else 3)
    warmup = 5 if device.type == "cuda" else 1
    # Rows print as they are measured, so a run cut short by a time limit still reports.
    for i, (tokens, shape, mode, times) in enumerate(
        run(tokens_list, shapes, dtype, device, reps, warmup, with_bnb=not args.no_bnb)
    ):
        if i == 0:
            print(format_header(list(times), dtype, device), flush=True)
        print(format_row(tokens, shape, mode, times), flush=True)


if __name__ == "__main__":
    main()
