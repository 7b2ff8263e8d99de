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
    """Moments after 100 Adam-style EMA steps of gradients with a per-row scale spread over 3
    decades (rows of a weight matrix differ that much in practice)."""
    gen = torch.Generator().manual_seed(seed)
    rows = numel // 1024
    scale = 10 ** (torch.rand(rows, 1, generator=gen) * 3 - 3)
    m = torch.zeros(rows, 1024)
    v = torch.zeros(rows, 1024)
    dist = torch.distributions.StudentT(3.0)
    for _ in range(100):
        if heavy_tailed:
            g = dist.sample((rows, 1024)) * scale
        else:
            g = torch.randn(rows, 1024, generator=gen) * scale
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
    return m.reshape(-1), v.reshape(-1)


def errors(x: torch.Tensor, code_map: torch.Tensor, block_size: int) -> tuple[float, float]:
    codes, absmax = quantize_blockwise_reference(x, code_map, block_size)
    err = (dequantize_blockwise_reference(codes, absmax, code_map, block_size) - x).double()
    relative = (err.abs() / x.double().abs().clamp_min(1e-30)).median().item()
    return err.abs().mean().item() / x.double().abs().mean().item(), relative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 20)
    args = parser.parse_args()
    torch.distributions.Distribution.set_default_validate_args(False)
    torch.manual_seed(0)
    print(f"{'data':<14}{'state':<8}{'block':>6}  {'mean|err|/mean|x|':>34}  {'median rel err':>30}  ratio")
    print(f"{'':<14}{'':<8}{'':>6}  {'dynamic':>16}{'linear':>18}  {'dynamic':>14}{'linear':>16}  lin/dyn")
    for heavy in (False, True):
        m, v = adam_like_states(args.numel, heavy)
        for state_name, x, signed in (("m", m, True), ("v", v, False)):
            for block_size in (256, 2048):
                dyn_mean, dyn_rel = errors(x, dynamic_map(signed), block_size)
                lin_mean, lin_rel = errors(x, linear_map(signed), block_size)
                data = "student-t(3)" if heavy else "normal"
                print(
                    f"{data:<14}{state_name:<8}{block_size:>6}  {dyn_mean:>16.5f}{lin_mean:>18.5f}  "
                    f"{dyn_rel:>14.5f}{lin_rel:>16.5f}  {lin_mean / dyn_mean:>6.2f}x"
                )


if __name__ == "__main__":
    main()
