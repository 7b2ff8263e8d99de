"""The ``CUDA`` kernels of the ``bytetune::`` ops: the Triton launchers (each launches under its
tensors' GPU, ``dispatch.launch_device``). Without triton installed, CUDA tensors run the CPU
backend's kernels (the PyTorch references, which run on any device)."""

from __future__ import annotations

from bytetune.kernels import blockwise, fused_linear_ce, gpu_arch, groupwise, int8_experts, int8_head, llm_int8
from bytetune.kernels import optim_update
from bytetune.kernels.backends import cpu
from bytetune.kernels.backends.common import autocast_off, late, optimizer_update_from_schema
from bytetune.kernels.backends.registry import IMPLEMENTATIONS, register, register_triton_route
from bytetune.kernels.dispatch import HAS_TRITON

# op -> (module, its Triton path)
_KERNELS = {
    "quantize_rowwise": (llm_int8, "quantize_rowwise_triton"),
    "column_absmax": (llm_int8, "column_absmax_triton"),
    "outlier_columns": (llm_int8, "outlier_columns_triton"),
    "quantize_tokenwise": (llm_int8, "quantize_tokenwise_triton"),
    "int8_matmul": (llm_int8, "int8_matmul_triton"),
    "int8_matmul_grad_input": (llm_int8, "int8_matmul_grad_input_triton"),
    # Fixed shapes (nothing waits for the device): a CUDA graph can capture the layer.
    "int8_linear": (llm_int8, "int8_linear_fixed_capacity"),
    "quantize_groupwise": (groupwise, "quantize_groupwise_triton"),
    "groupwise_matmul": (groupwise, "groupwise_matmul_triton"),
    "groupwise_matmul_grad_input": (groupwise, "groupwise_matmul_grad_input_triton"),
    "groupwise_linear": (groupwise, "groupwise_linear_composite"),
    "quantize_blockwise": (blockwise, "quantize_blockwise_triton"),
    "dequantize_blockwise": (blockwise, "dequantize_blockwise_triton"),
    "expert_column_absmax": (int8_experts, "expert_column_absmax_triton"),
    "grouped_int8_linear": (int8_experts, "grouped_int8_linear_triton"),
    "grouped_int8_grad_input": (int8_experts, "grouped_int8_grad_input_triton"),
    "cross_entropy_rows": (fused_linear_ce, "cross_entropy_rows_triton"),
}
_AUTOCAST_OFF = {"int8_linear", "int8_matmul_grad_input", "groupwise_linear", "groupwise_matmul_grad_input"}


def _weight_only_matmul(x, w_int8, w_scale):
    # tl.dot needs sm_80+ (bench/gpu_compile.py): older cards run the reference, with one warning
    if gpu_arch.dot_supported(x.device):
        return int8_head.weight_only_matmul_triton(x, w_int8, w_scale)
    return int8_head.weight_only_matmul_reference(x, w_int8, w_scale)


if HAS_TRITON:
    for _op, (_module, _launcher) in _KERNELS.items():
        _kernel = late(_module, _launcher)
        register(_op, "cuda", autocast_off(_kernel) if _op in _AUTOCAST_OFF else _kernel)
    register("weight_only_matmul", "cuda", _weight_only_matmul)
    register(
        "optimizer_update_8bit", "cuda", optimizer_update_from_schema(late(optim_update, "optimizer_update_8bit_triton"))
    )
    register_triton_route("cuda", lambda: True)
else:
    for (_qualname, _device), _kernel in list(IMPLEMENTATIONS.items()):
        if _device == "cpu":
            register(_qualname.removeprefix("bytetune::"), "cuda", _kernel)
    register_triton_route("cuda", cpu.use_triton)
