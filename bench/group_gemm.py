"""ZeroQuant GEMMs (GroupQuantLinear W8A8, W4A8, W4A16) vs a 16-bit nn.Linear.

Same grid as the int8 bench (bench/int8_linear.py): tokens 1 / 16 / 4096 and (in, out) 4096x4096,
4096x16384, 16384x4096 on CUDA (bf16); on CPU the large dims are divided by 8 and the peer is an
fp32 nn.Linear (CPU bf16 GEMMs are not what anyone runs). Times forward and forward + input
gradient (weights frozen, as under LoRA), reports milliseconds and speed relative to nn.Linear
(``t_linear / t_layer``: 1.00x = as fast, 0.50x = twice as slow) and weight bytes.

    python bench/group_gemm.py            # CUDA: full sizes; CPU: dims / 8
    python bench/group_gemm.py --small    # small sizes on any device
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bytetune.quant_layers.group_linear import GroupQuantLinear

FULL_TOKENS = [1, 16, 4096]
FULL_SHAPES = [(4096, 4096), (4096, 16384), (16384, 4096)]
SMALL_TOKENS = [1, 16, 512]
SMALL_SHAPES = [(512, 512), (512, 2048), (2048, 512)]
VARIANTS = [("W8A8", 8, 8), ("W4A8", 4, 8), ("W4A16", 4, 16)]  # (name, weight bits, act bits)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, reps, warmup) -> float:
    # Warm-up absorbs Triton compilation on the first calls.
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def weight_bytes(layer: nn.Module) -> int:
    tensors = [layer.weight] + ([layer.weight_scale] if isinstance(layer, GroupQuantLinear) else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions (default: 20 on CUDA, 3 on CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = device.type == "cuda" and not args.small
    tokens_grid, shapes = (FULL_TOKENS, FULL_SHAPES) if full else (SMALL_TOKENS, SMALL_SHAPES)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.reps or (20 if device.type == "cuda" else 3)
    warmup = 3 if device.type == "cuda" else 1
    print(f"device {device}, activations {dtype}, group size {args.group_size}, median of {reps}")
    print()
    print("| tokens | in x out | layer | fwd ms | fwd vs Linear | fwd+bwd ms | fwd+bwd vs Linear | weight MiB |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for in_f, out_f in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
        layers = [("nn.Linear", linear)] + [
            (name, GroupQuantLinear.from_linear(linear, bits=bits, group_size=args.group_size, act_bits=act_bits))
            for name, bits, act_bits in VARIANTS
        ]
        for tokens in tokens_grid:
            x = torch.randn(tokens, in_f, device=device, dtype=dtype)
            grad = torch.randn(tokens, out_f, device=device, dtype=dtype)
            base_fwd = base_bwd = None
            for name, layer in layers:
                def forward():
                    with torch.no_grad():
                        layer(x)

                x_req = x.clone().requires_grad_(True)

                def forward_backward():
                    layer(x_req).backward(grad)
                    x_req.grad = None

                fwd = median_ms(forward, device, reps, warmup)
                bwd = median_ms(forward_backward, device, reps, warmup)
                if base_fwd is None:
                    base_fwd, base_bwd = fwd, bwd
                print(
                    f"| {tokens} | {in_f}x{out_f} | {name} | {fwd:.3f} | {base_fwd / fwd:.2f}x | "
                    f"{bwd:.3f} | {base_bwd / bwd:.2f}x | {weight_bytes(layer) / 2**20:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
