"""Dynamic ("tree") quantization maps of the 8-bit optimizers (arXiv 2110.02861).

A map is 256 float codes in [-1, 1], sorted ascending, so the code of a value is its index in the
map. Decade ``i = 0..6`` holds the bin midpoints of ``linspace(0.1, 1)`` scaled by ``10**(i - 6)``:
``2**i`` codes per sign for the signed map (first moments, which change sign) and ``2**(i + 1)``
for the unsigned map (second moments, never negative), which spends the sign bit on resolution.
Both maps also hold 0 and 1.0, so a zero state and the block's absmax are exact.
"""

from __future__ import annotations

import functools

import torch

N_CODES = 256
_N_DECADES = 7


def _dynamic_map_values(signed: bool) -> list[float]:
    values: list[float] = [0.0, 1.0]
    for decade in range(_N_DECADES):
        n_codes = 2**decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, n_codes + 1, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade - (_N_DECADES - 1))).tolist()
        values += means
        if signed:
            values += [-x for x in means]
    return values


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    values = sorted(_dynamic_map_values(signed))
    if len(values) != N_CODES:
        raise AssertionError(f"dynamic map has {len(values)} codes, expected {N_CODES}")
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted float32 codes of the signed or unsigned dynamic map."""
    return _dynamic_map_cpu(signed).to(device)


def code_midpoints(code_map: torch.Tensor) -> torch.Tensor:
    """The 255 float32 midpoints between neighbouring codes: a value's nearest code is the number
    of midpoints strictly below it (ties go to the lower code), in the reference and the kernels."""
    return (code_map[:-1] + code_map[1:]) / 2


def linear_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """Linear absmax 8-bit codes (k / 127, k = -127..127, plus a duplicate 1.0 to fill 256): the
    baseline the dynamic map is compared against in bench/quant_error.py."""
    codes = torch.arange(-127, 128, dtype=torch.float32) / 127
    return torch.cat([codes, codes[-1:]]).to(device)
