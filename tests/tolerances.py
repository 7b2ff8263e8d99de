"""Float comparisons whose tolerance follows the magnitude of what is compared.

Two float32 sums of the same terms taken in another order (another SIMD width: AVX-512, AVX2 or
none; another BLAS blocking; chunks instead of one pass) differ by a few units in the last place
of the *sum's* scale, not of each element: a gradient element of 1e-3 next to one of 3.2 carries
the rounding of the 3.2-sized partial sums. A fixed absolute tolerance such as 1e-6 is then a
verdict on the host's CPU, not on the code (issue 17: red on AMD EPYC, green on AVX-512 Xeons).
"""

from __future__ import annotations

import torch


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5,
                          scale_rtol: float | None = None, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with ``atol = scale_rtol * max|expected|`` (scale_rtol
    defaults to rtol): elementwise relative error, plus an absolute slack of a relative error at
    the tensor's own scale. A wrong gradient (a missing token, a wrong normalisation) is off by a
    fraction of that scale and still fails."""
    scale = expected.detach().abs().double().max().item() if expected.numel() else 0.0
    if not torch.isfinite(torch.tensor(scale)) or scale == 0.0:
        scale = 1.0
    atol = (rtol if scale_rtol is None else scale_rtol) * scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg)


def assert_close_in_norm(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, name: str = "") -> None:
    """``||actual - expected|| <= rel * ||expected||`` in float64: the two agree to ``rel`` of the
    tensor's size. For trained weights compared across process layouts (FSDP shards, pipeline
    stages vs one process): an element of a LoRA B near 0 may round apart by more than ``rel`` of
    itself, or than a fixed 1e-5, when the gradient sums are taken in another order."""
    error = (actual.double() - expected.double()).norm()
    bound = rel * expected.double().norm()
    assert error <= bound, f"{name}: |difference| {float(error):.3g} > {rel} x |expected| ({float(bound):.3g})"


def assert_adapters_agree(actual: dict, expected: dict, lr: float = 1e-3) -> None:
    """Adapters trained in another process layout (FSDP shards, pipeline stages) equal one
    process's to 1e-5 of their size, all tensors together, and no element is off by a tenth of a
    step (lr). Per tensor, a relative bound is ill-posed: a LoRA B whose gradient is rounding
    noise (2e-7 in norm after four steps, seen in tiny Llama's first q_proj) differs by more than
    its own size at another SIMD width, while a wrong gradient moves many elements by a whole
    step. The gradients are summed in another order (reduce-scatter, point-to-point stages,
    AVX2 or no vector kernels), so an 8-bit state near a code midpoint may round the other way
    and move its element by ~1 % of a step (1.0007e-5 seen at ATEN_CPU_CAPABILITY=default)."""
    names = sorted(expected)
    assert sorted(actual) == names
    assert_close_in_norm(torch.cat([actual[n].reshape(-1) for n in names]),
                         torch.cat([expected[n].reshape(-1) for n in names]), rel=1e-5, name="adapters")
    for name in names:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0.1 * lr, msg=name)
