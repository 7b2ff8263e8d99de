"""The ``CPU`` kernels of the ``bytetune::`` ops: the PyTorch references.

Under ``BYTETUNE_FORCE_TRITON=1`` (with ``TRITON_INTERPRET=1`` set before triton is imported)
CPU tensors go through the Triton launchers instead, so the layer and optimizer suites exercise
the GPU path on a machine without a GPU. :func:`use_triton` is the only place in the package
that decides, per device, between a kernel and its reference (read at every call); what is left
elsewhere is the GPU's own fallback for cards below sm_80, which lack tl.dot.
"""

from __future__ import annotations

from bytetune.kernels import blockwise, fused_linear_ce, gpu_arch, groupwise, int8_experts, int8_head, llm_int8
from bytetune.kernels import optim_update
from bytetune.kernels.backends.common import autocast_off, late, optimizer_update_from_schema
from bytetune.kernels.backends.registry import register, register_triton_route
from bytetune.kernels.dispatch import HAS_TRITON, force_triton


def use_triton() -> bool:
    """Whether CPU tensors take the Triton launchers now (``BYTETUNE_FORCE_TRITON``, read per call)."""
    return HAS_TRITON and force_triton()


def _reference_or_triton(reference, launcher):
    def run(*args):
        return (launcher if use_triton() else reference)(*args)

    run.__name__ = run.__qualname__ = reference.__name__
    return run


# op -> (module, its reference, its Triton path)
_KERNELS = {
    "quantize_rowwise": (llm_int8, "quantize_rowwise_reference", "quantize_rowwise_triton"),
    "column_absmax": (llm_int8, "column_absmax_reference", "column_absmax_triton"),
    "outlier_columns": (llm_int8, "outlier_columns_reference", "outlier_columns_triton"),
    "quantize_tokenwise": (llm_int8, "quantize_tokenwise_reference", "quantize_tokenwise_triton"),
    "int8_matmul": (llm_int8, "int8_matmul_reference", "int8_matmul_triton"),
    "int8_matmul_grad_input": (llm_int8, "int8_matmul_grad_input_reference", "int8_matmul_grad_input_triton"),
    "int8_linear": (llm_int8, "int8_linear_reference", "int8_linear_fixed_capacity"),
    "quantize_groupwise": (groupwise, "quantize_groupwise_reference", "quantize_groupwise_triton"),
    "groupwise_matmul": (groupwise, "groupwise_matmul_reference", "groupwise_matmul_triton"),
    "groupwise_matmul_grad_input": (
        groupwise, "groupwise_matmul_grad_input_reference", "groupwise_matmul_grad_input_triton",
    ),
    "quantize_blockwise": (blockwise, "quantize_blockwise_reference", "quantize_blockwise_triton"),
    "dequantize_blockwise": (blockwise, "dequantize_blockwise_reference", "dequantize_blockwise_triton"),
    "expert_column_absmax": (int8_experts, "expert_column_absmax_reference", "expert_column_absmax_triton"),
    "grouped_int8_linear": (int8_experts, "grouped_int8_linear_reference", "grouped_int8_linear_triton"),
    "grouped_int8_grad_input": (int8_experts, "grouped_int8_grad_input_reference", "grouped_int8_grad_input_triton"),
    "cross_entropy_rows": (fused_linear_ce, "cross_entropy_rows_reference", "cross_entropy_rows_triton"),
}  # fmt: skip
# The layer ops: their kernels run with autocast off (common.autocast_off).
_AUTOCAST_OFF = {"int8_linear", "int8_matmul_grad_input", "groupwise_matmul_grad_input"}

for _op, (_module, _reference, _launcher) in _KERNELS.items():
    _kernel = _reference_or_triton(late(_module, _reference), late(_module, _launcher))
    register(_op, "cpu", autocast_off(_kernel) if _op in _AUTOCAST_OFF else _kernel)

# Composed of the ops above: on CPU of their references, called directly (one trip through the
# dispatcher per layer call); under BYTETUNE_FORCE_TRITON of the ops, as on the GPU.
register("groupwise_linear", "cpu", autocast_off(_reference_or_triton(
    late(groupwise, "groupwise_linear_reference"), late(groupwise, "groupwise_linear_composite"))))


def _weight_only_matmul(x, w_int8, w_scale):
    # tl.dot needs sm_80+ (bench/gpu_compile.py); in the interpreter it always runs.
    if use_triton() and gpu_arch.dot_supported(x.device):
        return int8_head.weight_only_matmul_triton(x, w_int8, w_scale)
    return int8_head.weight_only_matmul_reference(x, w_int8, w_scale)


register("weight_only_matmul", "cpu", _weight_only_matmul)
register(
    "optimizer_update_8bit",
    "cpu",
    optimizer_update_from_schema(
        _reference_or_triton(
            late(optim_update, "optimizer_update_8bit_reference"), late(optim_update, "optimizer_update_8bit_triton")
        )
    ),
)
register_triton_route("cpu", use_triton)
