"""Triton kernels, each beside its plain-PyTorch reference. Imports nothing else of bytetune.

Importing the package registers the layers' ``torch.library`` ops (``torch.ops.bytetune.*``).
"""

from bytetune.kernels import ops  # noqa: F401  (registers torch.ops.bytetune.*)
from bytetune.kernels.dispatch import HAS_TRITON, use_triton
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
    "use_triton",
    "int8_matmul",
    "int8_matmul_grad_input",
    "outlier_columns",
    "quantize_rowwise",
    "quantize_tokenwise",
    "select_outlier_columns",
]
