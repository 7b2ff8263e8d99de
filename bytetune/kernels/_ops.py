"""Every op of ``bytetune.kernels``, declared once with ``torch.library`` (namespace ``bytetune``):
its schema, its fake (shapes and dtypes only, what ``torch.compile`` and meta tensors see) and,
for the layer ops that have a backward, its autograd.

The implementations are registered per device by :mod:`bytetune.kernels.backends`: ``CUDA`` runs
the Triton launcher, ``CPU`` the PyTorch reference (or, under ``BYTETUNE_FORCE_TRITON=1``, the
Triton launcher in the interpreter). The public functions of each kernel module
(``llm_int8.int8_matmul``, ``groupwise.groupwise_matmul``, ...) call the op handles below, so
eager mode, ``torch.compile`` and every device go through the same door.

The ops are declared with the low-level ``torch.library.Library(...).define`` and called as
``torch.ops.bytetune.<op>.default``: that goes through the C++ dispatcher straight to the
registered Python kernel. ``torch.library.custom_op``'s Python wrapper costs more per call
(bench/op_dispatch.py; figures in bench/results/op_dispatch_cpu.md), and the layers pay it
hundreds of times per training step.

Nothing here imports an implementation, so the kernel modules can import the handles.
"""

from __future__ import annotations

import torch

LIBRARY = torch.library.Library("bytetune", "DEF")

# name -> schema (without the name). Optional trailing arguments have no defaults here: the
# public Python functions of the kernel modules hold the defaults and the docstrings.
SCHEMAS = {
    # LLM.int8() (bytetune.kernels.llm_int8)
    "quantize_rowwise": "(Tensor w) -> (Tensor, Tensor)",
    "column_absmax": "(Tensor x) -> Tensor",
    "outlier_columns": "(Tensor x, float threshold) -> Tensor",
    "quantize_tokenwise": "(Tensor x, Tensor? outlier_cols) -> (Tensor, Tensor)",
    "int8_matmul": (
        "(Tensor x_int8, Tensor w_int8, Tensor x_scale, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor"
    ),
    "int8_matmul_grad_input": "(Tensor grad_y, Tensor w_int8, Tensor w_scale) -> Tensor",
    "int8_linear": (
        "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias, float threshold, int outlier_capacity) -> Tensor"
    ),
    # ZeroQuant (bytetune.kernels.groupwise)
    "quantize_groupwise": "(Tensor weight, int bits, int group_size) -> (Tensor, Tensor)",
    "groupwise_matmul": (
        "(Tensor x, Tensor? x_scale, Tensor codes, Tensor scales, int bits, int group_size, Tensor? bias, "
        "ScalarType? out_dtype) -> Tensor"
    ),
    "groupwise_matmul_grad_input": (
        "(Tensor grad_y, Tensor codes, Tensor scales, int bits, int group_size, int in_features) -> Tensor"
    ),
    "groupwise_linear": (
        "(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int bits, int group_size, int act_bits) -> Tensor"
    ),
    # Block-wise 8-bit states (bytetune.kernels.blockwise, bytetune.kernels.optim_update)
    "quantize_blockwise": "(Tensor x, Tensor code_map, int block_size) -> (Tensor, Tensor)",
    "dequantize_blockwise": (
        "(Tensor codes, Tensor absmax, Tensor code_map, int block_size, ScalarType dtype) -> Tensor"
    ),
    # In place on params and both states' codes and absmax; a one-state optimizer passes empty
    # lists (and no book) for the second state. ``scalars`` is UpdateScalars' fields in order.
    "optimizer_update_8bit": (
        "(int kind, float[] scalars, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] codes1, "
        "Tensor(c!)[] absmax1, Tensor book1_codes, Tensor book1_midpoints, Tensor(d!)[] codes2, "
        "Tensor(e!)[] absmax2, Tensor? book2_codes, Tensor? book2_midpoints, bool nesterov, int block_size) -> ()"
    ),
    # Mixture-of-experts LLM.int8() (bytetune.kernels.int8_experts)
    "expert_column_absmax": "(Tensor x, Tensor offsets) -> Tensor",
    "grouped_int8_linear": (
        "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor offsets, float threshold, int outlier_capacity) -> Tensor"
    ),
    "grouped_int8_grad_input": "(Tensor grad_y, Tensor w_int8, Tensor w_scale, Tensor offsets) -> Tensor",
    # Int8 output head (bytetune.kernels.int8_head) and its cross-entropy (fused_linear_ce)
    "weight_only_matmul": "(Tensor x, Tensor w_int8, Tensor w_scale) -> Tensor",
    # Overwrites logits with d(sum of the CE)/d(logits).
    "cross_entropy_rows": "(Tensor(a!) logits, Tensor targets) -> Tensor",
}

for _name, _schema in SCHEMAS.items():
    LIBRARY.define(_name + _schema)


def _fake(name):
    def register(fn):
        torch.library.register_fake(f"bytetune::{name}", fn, lib=LIBRARY)
        return fn

    return register


@_fake("quantize_rowwise")
def _(w):
    return torch.empty_like(w, dtype=torch.int8), w.new_empty(w.shape[0], dtype=torch.float32)


@_fake("column_absmax")
def _(x):
    return x.new_empty(x.shape[1], dtype=torch.float32)


@_fake("outlier_columns")
def _(x, threshold):
    # The count of outlier columns is data: a size the tracer does not know.
    return x.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)


@_fake("quantize_tokenwise")
def _(x, outlier_cols):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@_fake("int8_matmul")
def _(x_int8, w_int8, x_scale, w_scale, bias, out_dtype):
    return x_int8.new_empty(x_int8.shape[0], w_int8.shape[0], dtype=out_dtype)


@_fake("int8_matmul_grad_input")
def _(grad_y, w_int8, w_scale):
    return grad_y.new_empty(grad_y.shape[0], w_int8.shape[1])


@_fake("int8_linear")
def _(x, w_int8, w_scale, bias, threshold, outlier_capacity):
    return x.new_empty(x.shape[0], w_int8.shape[0])


@_fake("quantize_groupwise")
def _(weight, bits, group_size):
    n, k = weight.shape
    codes = weight.new_empty(n, k // 2, dtype=torch.uint8) if bits == 4 else torch.empty_like(weight, dtype=torch.int8)
    return codes, weight.new_empty(n, -(-k // group_size), dtype=torch.float32)


@_fake("groupwise_matmul")
def _(x, x_scale, codes, scales, bits, group_size, bias, out_dtype):
    dtype = out_dtype or (x.dtype if x_scale is None else torch.float32)
    return x.new_empty(x.shape[0], codes.shape[0], dtype=dtype)


@_fake("groupwise_matmul_grad_input")
def _(grad_y, codes, scales, bits, group_size, in_features):
    return grad_y.new_empty(grad_y.shape[0], in_features)


@_fake("groupwise_linear")
def _(x, codes, scales, bias, bits, group_size, act_bits):
    return x.new_empty(x.shape[0], codes.shape[0])


@_fake("quantize_blockwise")
def _(x, code_map, block_size):
    return torch.empty_like(x, dtype=torch.uint8), x.new_empty(-(-x.numel() // block_size), dtype=torch.float32)


@_fake("dequantize_blockwise")
def _(codes, absmax, code_map, block_size, dtype):
    return torch.empty_like(codes, dtype=dtype)


@_fake("optimizer_update_8bit")
def _(*args):
    return None


@_fake("expert_column_absmax")
def _(x, offsets):
    return x.new_empty(offsets.shape[0] - 1, x.shape[1], dtype=torch.float32)


@_fake("grouped_int8_linear")
def _(x, w_int8, w_scale, offsets, threshold, outlier_capacity):
    return x.new_empty(x.shape[0], w_int8.shape[1])


@_fake("grouped_int8_grad_input")
def _(grad_y, w_int8, w_scale, offsets):
    return grad_y.new_empty(grad_y.shape[0], w_int8.shape[2])


@_fake("weight_only_matmul")
def _(x, w_int8, w_scale):
    return x.new_empty(x.shape[0], w_int8.shape[0])


@_fake("cross_entropy_rows")
def _(logits, targets):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


# The handles the kernel modules call (OpOverloads: one attribute lookup fewer per call).
quantize_rowwise = torch.ops.bytetune.quantize_rowwise.default
column_absmax = torch.ops.bytetune.column_absmax.default
outlier_columns = torch.ops.bytetune.outlier_columns.default
quantize_tokenwise = torch.ops.bytetune.quantize_tokenwise.default
int8_matmul = torch.ops.bytetune.int8_matmul.default
int8_matmul_grad_input = torch.ops.bytetune.int8_matmul_grad_input.default
int8_linear = torch.ops.bytetune.int8_linear.default
quantize_groupwise = torch.ops.bytetune.quantize_groupwise.default
groupwise_matmul = torch.ops.bytetune.groupwise_matmul.default
groupwise_matmul_grad_input = torch.ops.bytetune.groupwise_matmul_grad_input.default
groupwise_linear = torch.ops.bytetune.groupwise_linear.default
quantize_blockwise = torch.ops.bytetune.quantize_blockwise.default
dequantize_blockwise = torch.ops.bytetune.dequantize_blockwise.default
optimizer_update_8bit = torch.ops.bytetune.optimizer_update_8bit.default
expert_column_absmax = torch.ops.bytetune.expert_column_absmax.default
grouped_int8_linear = torch.ops.bytetune.grouped_int8_linear.default
grouped_int8_grad_input = torch.ops.bytetune.grouped_int8_grad_input.default
weight_only_matmul = torch.ops.bytetune.weight_only_matmul.default
cross_entropy_rows = torch.ops.bytetune.cross_entropy_rows.default


# ----------------------------------------------------------------------------------------------
# Autograd of the layer ops (differentiable in x and bias; the weights are frozen)
#
# Registered as the op's ``Autograd`` kernel: a plain autograd.Function whose forward re-enters
# the dispatcher below autograd (to the device kernel, or the fake when tracing). The lighter
# twin of ``torch.library.register_autograd``, which wraps the same in pytree flattening and a
# keyset argument, at more per call (bench/results/op_dispatch_cpu.md).
# ----------------------------------------------------------------------------------------------


class Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_int8, w_scale, bias, threshold, outlier_capacity):
        ctx.save_for_backward(w_int8, w_scale)
        ctx.has_bias = bias is not None
        with torch._C._AutoDispatchBelowAutograd():
            return int8_linear(x, w_int8, w_scale, bias, threshold, outlier_capacity)

    @staticmethod
    def backward(ctx, grad_y):
        # Straight-through: quantizing the activations counts as identity, so grad_x = grad_y @ W.
        w_int8, w_scale = ctx.saved_tensors
        grad_x = int8_matmul_grad_input(grad_y, w_int8, w_scale) if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None, None


class GroupwiseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, scales, bias, bits, group_size, act_bits):
        ctx.save_for_backward(codes, scales)
        ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, x.shape[1]
        ctx.has_bias = bias is not None
        with torch._C._AutoDispatchBelowAutograd():
            return groupwise_linear(x, codes, scales, bias, bits, group_size, act_bits)

    @staticmethod
    def backward(ctx, grad_y):
        codes, scales = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = groupwise_matmul_grad_input(grad_y, codes, scales, ctx.bits, ctx.group_size, ctx.in_features)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.sum(0)
        return grad_x, None, None, grad_bias, None, None, None


LIBRARY.impl("int8_linear", Int8LinearFunction.apply, "Autograd")
LIBRARY.impl("groupwise_linear", GroupwiseLinearFunction.apply, "Autograd")

