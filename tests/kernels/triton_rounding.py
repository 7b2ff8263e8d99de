"""How a Triton kernel's float32 -> 16-bit store rounds, so tests can demand exact equality.

triton 3.9's interpreter (TRITON_INTERPRET=1, CPU) converts float32 to bfloat16 by truncating
the low 16 bits; compiled kernels on a GPU round to nearest even like torch. float16 rounds to
nearest in both.
"""

import torch


def cast_like_triton(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.float()
    if dtype == torch.bfloat16 and not x.is_cuda:
        return (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    return x.to(dtype)
