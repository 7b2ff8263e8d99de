"""The small-second-moment case of arXiv 2110.02861's 8-bit Adam (issue 22), side by side.

An element whose gradient is far below the largest of its 256-element block gets a second moment
below the unsigned map's smallest nonzero code (about 3.3e-7 of the block's absmax); if a later
gradient of that element is 0, Adam's update is m_hat / (sqrt(v_hat) + eps). With v rounded to 0
that is m_hat / eps: thousands of times the 32-bit step. Prints, for every 8-bit optimizer, the
element's value after two steps (gradient 1e-4, then 0) next to its 32-bit counterpart's, and the
ratio. Run: `python bench/optim_small_v.py` (CPU, a second).
"""

from __future__ import annotations

import torch

from bytetune.optim import Adam8bit, AdamW8bit, Lion8bit, SGD8bit

N = 4096  # min_8bit_size: the states are 8-bit


def two_steps(make) -> float:
    p = torch.nn.Parameter(torch.zeros(N))
    opt = make([p])
    g = torch.zeros(N)
    g[0], g[1] = 1.0, 1e-4
    p.grad = g
    opt.step()
    p.grad = torch.zeros(N)
    opt.step()
    return float(p.detach()[1])


PAIRS = {
    "Adam8bit": (lambda ps: Adam8bit(ps, lr=1e-3), lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    "AdamW8bit": (lambda ps: AdamW8bit(ps, lr=1e-3), lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
    "SGD8bit": (
        lambda ps: SGD8bit(ps, lr=1e-3, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    ),
    "Lion8bit": (lambda ps: Lion8bit(ps, lr=1e-3), lambda ps: Lion8bit(ps, lr=1e-3, optim_bits=32)),
}


def peers() -> dict:
    """The peers' 8-bit Adam on CPU, where installed (the `bench` extra)."""
    found = {}
    try:
        import bitsandbytes as bnb

        found["bitsandbytes Adam8bit"] = lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3)
    except Exception as error:  # noqa: BLE001 - a peer that cannot load is reported, not fatal
        print(f"(bitsandbytes not measured: {type(error).__name__})")
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        found["torchao AdamW8bit"] = lambda ps: AoAdamW8bit(ps, lr=1e-3, weight_decay=0.0)
    except Exception as error:  # noqa: BLE001
        print(f"(torchao not measured: {type(error).__name__})")
    return found


def main() -> None:
    print("| optimizer | p[1] 8-bit | p[1] 32-bit | ratio |")
    print("|---|---|---|---|")
    for name, (eight, thirty_two) in PAIRS.items():
        a, b = two_steps(eight), two_steps(thirty_two)
        print(f"| {name} | {a:.6g} | {b:.6g} | {a / b:.3g}x |")
    torch_adam = two_steps(PAIRS["Adam8bit"][1])
    for name, make in peers().items():
        a = two_steps(make)
        print(f"| {name} (peer) | {a:.6g} | {torch_adam:.6g} (torch Adam) | {a / torch_adam:.3g}x |")


if __name__ == "__main__":
    main()
