"""Quantization error on Adam-state-like data: block-wise dynamic 8-bit vs linear absmax 8-bit at
the same block size (and the same float32 absmax per block), for first moments (signed) and
second moments (unsigned), with normal and heavy-tailed (Student-t, 3 dof) gradients.

Usage: python bench/quant_error.py [--numel N]   (CPU is fine; runs the PyTorch reference)
"""

from __future__ import annotations

import argparse

import torch

from bytetune.kernels.blockwise import dequantize_blockwise_reference, quantize_blockwise_reference
from bytetune.kernels.quant_maps import dynamic_map, linear_map


def adam_like_states(numel: int, heavy_tailed: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments after 50 Adam EMA steps (beta1 0.9, beta2 0.999, bias-corrected) of gradients whose
    scale varies per element (log-normal, sigma 1.5: weights in one block see gradients orders of
    magnitude apart) and per row of 1024 (3 decades)."""
    gen = torch.Generator().manual_seed(seed)
    rows = numel // 1024
    scale = 10 ** (torch.rand(rows, 1, generator=gen) * 3 - 3) * torch.exp(1.5 * torch.randn(rows, 1024, generator=gen))
    m = torch.zeros(rows, 1024)
    v = torch.zeros(rows, 1024)
    dist = torch.distributions.StudentT(3.0)
    steps = 50
    for _ in range(steps):
        noise = dist.sample((rows, 1024)) if heavy_tailed else torch.randn(rows, 1024, generator=gen)
        g = (noise + 0.3) * scale  # a little signal under the noise, like real gradients
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
    return (m / (1 - 0.9**steps)).reshape(-1), (v / (1 - 0.999**steps)).reshape(-1)


def roundtrip(x: torch.Tensor, code_map: torch.Tensor, block_size: int) -> torch.Tensor:
    codes, absmax = quantize_blockwise_reference(x, code_map, block_size)
    return dequantize_blockwise_reference(codes, absmax, code_map, block_size)


def state_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean absolute error relative to the mean magnitude."""
    return ((x_hat - x).double().abs().mean() / x.double().abs().mean()).item()


def update_error(m, v, m_hat, v_hat, eps: float = 1e-8) -> float:
    """Median relative error of the Adam update m / (sqrt(v) + eps): what the states are for."""
    exact = (m / (v.sqrt() + eps)).double()
    approx = (m_hat / (v_hat.sqrt() + eps)).double()
    return ((approx - exact).abs() / exact.abs().clamp_min(1e-12)).median().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 20)
    args = parser.parse_args()
    torch.distributions.Distribution.set_default_validate_args(False)
    torch.manual_seed(0)
    print("# mean|err|/mean|x| of the states and median relative error of the Adam update m/(sqrt(v)+eps)")
    print("# ratio = linear error / dynamic error (> 1: dynamic is better)")
    print(f"{'gradients':<14}{'block':>6}  {'metric':<12}{'dynamic':>10}{'linear':>10}{'ratio':>8}")
    for heavy in (False, True):
        m, v = adam_like_states(args.numel, heavy)
        for block_size in (256, 2048):
            quantized = {
                name: (roundtrip(m, make(True), block_size), roundtrip(v, make(False), block_size))
                for name, make in (("dynamic", dynamic_map), ("linear", linear_map))
            }
            rows = {
                "m": {k: state_error(m, mv[0]) for k, mv in quantized.items()},
                "v": {k: state_error(v, mv[1]) for k, mv in quantized.items()},
                "update": {k: update_error(m, v, *mv) for k, mv in quantized.items()},
            }
            data = "student-t(3)" if heavy else "normal"
            for metric, err in rows.items():
                ratio = err["linear"] / err["dynamic"]
                print(f"{data:<14}{block_size:>6}  {metric:<12}{err['dynamic']:>10.5f}{err['linear']:>10.5f}{ratio:>7.2f}x")


if __name__ == "__main__":
    main()
