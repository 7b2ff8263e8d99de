"""The quantized linear layers' forward and input-gradient ops, registered with ``torch.library``
(namespace ``bytetune``). ``IMPLEMENTATIONS`` maps each op's name to its Python body (what a
dispatch mode in the tests steps into).

Each op is opaque to ``torch.compile`` (a fake implementation gives its output's shape and
dtype), so a model with these layers traces without graph breaks, and its backward is the
matching input-gradient op. In eager mode the layers' entry points (:func:`int8_linear`,
:func:`groupwise_linear`) run the same bodies through a plain autograd.Function instead. Inside,
the ops call the public kernel functions, which choose between the Triton kernel and the PyTorch
reference (``dispatch.use_triton``, nowhere else).

On the GPU nothing in these ops waits for the device: LLM.int8()'s outlier columns are chosen
with fixed shapes (:func:`bytetune.kernels.llm_int8.select_outlier_columns`), so the forward and
backward can be captured in a CUDA graph and never stall the host. The CPU path reads how many
outlier columns there are (a CPU has no device to wait for) and multiplies only those.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from bytetune.kernels import groupwise, llm_int8


def _autocast_off(body):
    """Run an op's body with autocast off. The layers cast their input to the autocast dtype
    themselves; inside, the references' float32 partial products (and the int8 reference's
    float64 GEMM) must keep their precision, and autocast would recast those matmuls to 16 bits."""

    @functools.wraps(body)
    def run(*args, **kwargs):
        device_type = args[0].device.type
        if not torch.is_autocast_enabled(device_type):
            return body(*args, **kwargs)  # entering the context costs more than this check
        with torch.autocast(device_type, enabled=False):
            return body(*args, **kwargs)

    return run


def _eager_function(name, body, setup_context, backward, grad_input_body) -> type[torch.autograd.Function]:
    """A registered op's body, setup and backward as a plain autograd.Function, for eager mode.

    torch.library's dispatch costs ~0.1 ms of Python per call, forward and backward: about 4 %
    of a SmolLM2 LoRA step on 2 CPU cores. Eager mode gains nothing from it, so the layers call
    this Function there, and the registered op (opaque to torch.compile, with its fake) when
    compiling. The backward is the op's own, with the input-gradient body called directly.
    """

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = body(*inputs)
            setup_context(ctx, inputs, output)
            ctx.grad_input = grad_input_body
            return output

        @staticmethod
        def backward(ctx, grad_output):
            return backward(ctx, grad_output)

    EagerOp.__name__ = EagerOp.__qualname__ = name  # what profiles and grad_fn names show
    return EagerOp


# ----------------------------------------------------------------------------------------------
# LLM.int8()
# ----------------------------------------------------------------------------------------------


@_autocast_off
def _int8_linear(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float, outlier_capacity: int
) -> Tensor:
    """x [M, K] @ dequant(w_int8).T + bias in x's dtype, with LLM.int8()'s outlier decomposition
    (:func:`bytetune.kernels.llm_int8.int8_linear`)."""
    return llm_int8.int8_linear(x, w_int8, w_scale, bias, threshold, outlier_capacity)


int8_linear_op = torch.library.custom_op("bytetune::int8_linear", _int8_linear, mutates_args=())


@int8_linear_op.register_fake
def _(x, w_int8, w_scale, bias, threshold, outlier_capacity):
    return x.new_empty(x.shape[0], w_int8.shape[0])


@_autocast_off
def _int8_matmul_grad_input(grad_y: Tensor, w_int8: Tensor, w_scale: Tensor) -> Tensor:
    """grad_y [M, N] @ dequant(w_int8) [N, K] in grad_y's dtype."""
    return llm_int8.int8_matmul_grad_input(grad_y, w_int8, w_scale)


int8_matmul_grad_input_op = torch.library.custom_op(
    "bytetune::int8_matmul_grad_input", _int8_matmul_grad_input, mutates_args=()
)


@int8_matmul_grad_input_op.register_fake
def _(grad_y, w_int8, w_scale):
    return grad_y.new_empty(grad_y.shape[0], w_int8.shape[1])


def _int8_linear_setup_context(ctx, inputs, output):
    _, w_int8, w_scale, bias, _, _ = inputs
    ctx.save_for_backward(w_int8, w_scale)
    ctx.has_bias = bias is not None
    ctx.grad_input = int8_matmul_grad_input_op


def _int8_linear_backward(ctx, grad_y):
    # Straight-through: quantizing the activations counts as identity, so grad_x = grad_y @ W.
    w_int8, w_scale = ctx.saved_tensors
    grad_x = ctx.grad_input(grad_y, w_int8, w_scale) if ctx.needs_input_grad[0] else None
    grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_bias, None, None


int8_linear_op.register_autograd(_int8_linear_backward, setup_context=_int8_linear_setup_context)
_Int8LinearEager = _eager_function(
    "Int8LinearEager", _int8_linear, _int8_linear_setup_context, _int8_linear_backward, _int8_matmul_grad_input
)


def int8_linear(
    x: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float, outlier_capacity: int
) -> Tensor:
    """Int8Linear's forward, differentiable in x and bias: ``bytetune::int8_linear`` when
    torch.compile traces it, the same body and backward as an autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return int8_linear_op(x, w_int8, w_scale, bias, threshold, outlier_capacity)
    return _Int8LinearEager.apply(x, w_int8, w_scale, bias, threshold, outlier_capacity)


# ----------------------------------------------------------------------------------------------
# ZeroQuant (group-wise weights)
# ----------------------------------------------------------------------------------------------


@_autocast_off
def _groupwise_linear(
    x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None, bits: int, group_size: int, act_bits: int
) -> Tensor:
    """x [M, K] @ dequant(codes).T + bias in x's dtype; with ``act_bits=8`` x is first quantized
    per token to int8 (W8A8 / W4A8), with ``act_bits=16`` it multiplies the codes as it is."""
    if act_bits == 8:
        x_codes, x_scale = groupwise.quantize_tokenwise_step(x)
        return groupwise.groupwise_matmul(
            x_codes, x_scale, codes, scales, bits, group_size, bias=bias, out_dtype=x.dtype
        )
    return groupwise.groupwise_matmul(x, None, codes, scales, bits, group_size, bias=bias, out_dtype=x.dtype)


groupwise_linear_op = torch.library.custom_op("bytetune::groupwise_linear", _groupwise_linear, mutates_args=())


@groupwise_linear_op.register_fake
def _(x, codes, scales, bias, bits, group_size, act_bits):
    return x.new_empty(x.shape[0], codes.shape[0])


@_autocast_off
def _groupwise_matmul_grad_input(
    grad_y: Tensor, codes: Tensor, scales: Tensor, bits: int, group_size: int, in_features: int
) -> Tensor:
    """grad_y [M, N] @ dequant(codes) [N, in_features] in grad_y's dtype."""
    return groupwise.groupwise_matmul_grad_input(grad_y, codes, scales, bits, group_size, in_features)


groupwise_matmul_grad_input_op = torch.library.custom_op(
    "bytetune::groupwise_matmul_grad_input", _groupwise_matmul_grad_input, mutates_args=()
)


@groupwise_matmul_grad_input_op.register_fake
def _(grad_y, codes, scales, bits, group_size, in_features):
    return grad_y.new_empty(grad_y.shape[0], in_features)


def _groupwise_linear_setup_context(ctx, inputs, output):
    x, codes, scales, bias, bits, group_size, _ = inputs
    ctx.save_for_backward(codes, scales)
    ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, x.shape[1]
    ctx.has_bias = bias is not None
    ctx.grad_input = groupwise_matmul_grad_input_op


def _groupwise_linear_backward(ctx, grad_y):
    codes, scales = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = ctx.grad_input(grad_y, codes, scales, ctx.bits, ctx.group_size, ctx.in_features)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_y.sum(0)
    return grad_x, None, None, grad_bias, None, None, None


groupwise_linear_op.register_autograd(_groupwise_linear_backward, setup_context=_groupwise_linear_setup_context)
_GroupwiseLinearEager = _eager_function(
    "GroupwiseLinearEager",
    _groupwise_linear,
    _groupwise_linear_setup_context,
    _groupwise_linear_backward,
    _groupwise_matmul_grad_input,
)


def groupwise_linear(
    x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None, bits: int, group_size: int, act_bits: int
) -> Tensor:
    """GroupQuantLinear's forward, differentiable in x and bias: ``bytetune::groupwise_linear``
    when torch.compile traces it, the same body and backward as an autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return groupwise_linear_op(x, codes, scales, bias, bits, group_size, act_bits)
    return _GroupwiseLinearEager.apply(x, codes, scales, bias, bits, group_size, act_bits)


IMPLEMENTATIONS = {
    "bytetune::int8_linear": _int8_linear,
    "bytetune::int8_matmul_grad_input": _int8_matmul_grad_input,
    "bytetune::groupwise_linear": _groupwise_linear,
    "bytetune::groupwise_matmul_grad_input": _groupwise_matmul_grad_input,
}
