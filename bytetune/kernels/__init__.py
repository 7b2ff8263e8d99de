"""Triton kernels, each beside its plain-PyTorch reference. Imports nothing else of bytetune.

Every op is declared once with ``torch.library`` (:mod:`bytetune.kernels._ops`:
``torch.ops.bytetune.*``); importing the package registers its kernels per device
(:mod:`bytetune.kernels.backends`).
"""

from bytetune.kernels import backends  # noqa: F401  (registers the torch.ops.bytetune.* kernels)
from bytetune.kernels.dispatch import HAS_TRITON
from bytetune.kernels.llm_int8 import (
    int8_matmul,
    int8_matmul_grad_input,
    outlier_columns,
    quantize_rowwise,
    quantize_tokenwise,
    select_outlier_columns,
)

__all__ = [
    "HAS_TRITON",
    "int8_matmul",
    "int8_matmul_grad_input",
    "outlier_columns",
    "quantize_rowwise",
    "quantize_tokenwise",
    "select_outlier_columns",
]
