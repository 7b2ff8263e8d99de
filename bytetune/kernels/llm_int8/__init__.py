"""LLM.int8() kernels (arXiv 2208.07339): row-wise weight quantization, token-wise activation
quantization with outlier columns, the int8 x int8 -> int32 matmul with a fused dequantizing
epilogue, and the input gradient that dequantizes weight tiles on the fly.

One module per op, each holding the op's input checks, its PyTorch reference, its tile menu, its
Triton kernel and launcher, and its public function:

- :mod:`.quantize_rows`: ``quantize_rowwise`` (weights) and ``quantize_tokenwise`` (activations);
- :mod:`.outliers`: ``column_absmax``, ``outlier_columns``, ``select_outlier_columns``;
- :mod:`.matmul`: ``int8_matmul``;
- :mod:`.matmul_grad_input`: ``int8_matmul_grad_input``;
- :mod:`.linear`: ``int8_linear``, the layer forward composed of the above;
- :mod:`.common`: the checks, launch helpers and Triton helpers they share (the int8 K-loop
  :func:`~.common.int8_dot_k_loop` is also the experts' GEMM's).

Quantization convention (shared by every op here and by ``bytetune.quant_layers``):
``code = round_half_to_even(127 * value / absmax)`` computed in float32, stored as int8; the
scale kept is the float32 absmax itself, so ``value ~= code * scale / 127``. A row whose absmax
is 0 gets scale 1.0: its codes are all 0 either way, and the guard keeps 0/0 out of the math.

Each op exists as ``<op>_reference`` (plain PyTorch, the CPU path and the test oracle) and
``<op>_triton`` (the GPU path); the public ``<op>`` calls the registered op
``torch.ops.bytetune.<op>`` (:mod:`bytetune.kernels._ops`), whose kernel for each device
:mod:`bytetune.kernels.backends` registers. The backends look these names up here at each call.
"""

from bytetune.kernels.llm_int8.common import FIXED_GPU_TILE
from bytetune.kernels.llm_int8.linear import int8_linear, int8_linear_fixed_capacity, int8_linear_reference
from bytetune.kernels.llm_int8.matmul import (
    MATMUL_TILES,
    int8_matmul,
    int8_matmul_reference,
    int8_matmul_triton,
    matmul_shared_bytes,
)
from bytetune.kernels.llm_int8.matmul_grad_input import (
    FIXED_GPU_TILE_FP32_GRAD,
    GRAD_INPUT_TILES,
    GRAD_INPUT_TILES_FP32,
    REFERENCE_GRAD_CHUNK_ELEMENTS,
    grad_input_shared_bytes,
    int8_matmul_grad_input,
    int8_matmul_grad_input_reference,
    int8_matmul_grad_input_triton,
)
from bytetune.kernels.llm_int8.outliers import (
    COLUMN_ABSMAX_TILE,
    column_absmax,
    column_absmax_reference,
    column_absmax_triton,
    outlier_columns,
    outlier_columns_reference,
    outlier_columns_triton,
    select_outlier_columns,
)
from bytetune.kernels.llm_int8.quantize_rows import (
    QUANTIZE_ROWS_BLOCK_K,
    quantize_rowwise,
    quantize_rowwise_reference,
    quantize_rowwise_triton,
    quantize_tokenwise,
    quantize_tokenwise_reference,
    quantize_tokenwise_triton,
)

__all__ = [
    "quantize_rowwise",
    "quantize_rowwise_reference",
    "quantize_rowwise_triton",
    "outlier_columns",
    "outlier_columns_reference",
    "outlier_columns_triton",
    "column_absmax",
    "column_absmax_reference",
    "column_absmax_triton",
    "select_outlier_columns",
    "quantize_tokenwise",
    "quantize_tokenwise_reference",
    "quantize_tokenwise_triton",
    "int8_matmul",
    "int8_linear",
    "int8_linear_reference",
    "int8_linear_fixed_capacity",
    "int8_matmul_reference",
    "int8_matmul_triton",
    "int8_matmul_grad_input",
    "int8_matmul_grad_input_reference",
    "int8_matmul_grad_input_triton",
    # tile menus and shared-memory bounds (the compile gate, bench/gpu_compile.py, reads them)
    "COLUMN_ABSMAX_TILE",
    "FIXED_GPU_TILE",
    "FIXED_GPU_TILE_FP32_GRAD",
    "GRAD_INPUT_TILES",
    "GRAD_INPUT_TILES_FP32",
    "MATMUL_TILES",
    "QUANTIZE_ROWS_BLOCK_K",
    "REFERENCE_GRAD_CHUNK_ELEMENTS",
    "grad_input_shared_bytes",
    "matmul_shared_bytes",
]
