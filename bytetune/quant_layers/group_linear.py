"""ZeroQuant linear layer (arXiv 2206.01861): group-wise INT8/INT4 weight, INT8 or 16-bit activations.

Forward: with ``act_bits=8`` the activations are quantized per token to int8 and the GEMM adds
up each K-group's int32 partial product times the group's weight scale (W8A8 / W4A8); with
``act_bits=16`` the float activations multiply the integer codes and the per-group scales are
applied the same way (W8A16 / W4A16).

Backward: the input gradient only (the weight is frozen), from the kernel that dequantizes weight
tiles in registers. Quantizing the activations is treated as identity (straight-through).

Both are ``torch.library`` ops (``torch.ops.bytetune.groupwise_linear``), so torch.compile traces
the layer without a graph break. Under ``torch.autocast`` the input is cast to the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from bytetune.kernels.groupwise import (
    DEFAULT_GROUP_SIZE,
    dequantize_groupwise,
    num_groups,
    pack_int4,
    qmax_for,
    quantize_groupwise,
)
from bytetune.kernels.groupwise import groupwise_linear
from bytetune.quant_layers.frozen_linear import FrozenQuantLinear

SUPPORTED_ACT_BITS = (8, 16)


class GroupQuantLinear(FrozenQuantLinear):
    """A frozen ZeroQuant linear layer.

    State: ``weight`` (a frozen Parameter so that PEFT and transformers see a Linear: int8 codes
    [out, in] for bits=8, uint8 [out, in // 2] with two INT4 codes per byte for bits=4),
    ``weight_scale`` (float32 buffer [out, ceil(in / group_size)]) and an optional ``bias``.
    ``bits`` and ``group_size`` define the storage; ``act_bits`` (8 or 16) is a forward-time choice.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        group_size: int = DEFAULT_GROUP_SIZE,
        act_bits: int = 8,
        device=None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        qmax_for(bits)
        if act_bits not in SUPPORTED_ACT_BITS:
            raise ValueError(f"act_bits must be 8 (int8 tokens) or 16 (float activations), got {act_bits}")
        if bits == 4 and in_features % 2 != 0:
            raise ValueError(f"INT4 packs two codes per byte: in_features must be even, got {in_features}; use bits=8")
        code_shape, code_dtype = (
            ((out_features, in_features), torch.int8) if bits == 8 else ((out_features, in_features // 2), torch.uint8)
        )
        super().__init__(
            in_features,
            out_features,
            bias,
            code_shape=code_shape,
            code_dtype=code_dtype,
            scale_shape=(out_features, num_groups(in_features, group_size)),
            device=device,
            bias_dtype=bias_dtype,
        )
        self.bits = bits
        self.group_size = group_size
        self.act_bits = act_bits

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE, act_bits: int = 8
    ) -> "GroupQuantLinear":
        """Quantize an nn.Linear's weight group-wise (absmax per group)."""
        if isinstance(linear, GroupQuantLinear) or not isinstance(linear, nn.Linear):
            raise TypeError(f"expected a float nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            bits=bits,
            group_size=group_size,
            act_bits=act_bits,
            device=linear.weight.device,
            bias_dtype=None if linear.bias is None else linear.bias.dtype,
        )
        layer.set_weight(linear.weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float [out, in] weight into this layer's codes and group scales."""
        self._check_float_weight(weight)
        codes, scales = quantize_groupwise(weight.float(), self.bits, self.group_size)
        self.weight.data = codes.to(self.weight.device)
        self.weight_scale = scales.to(self.weight.device)

    @torch.no_grad()
    def quantize_checkpoint_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, float32 group scales) of a float [out, in] weight read from a checkpoint: how
        the checkpoint loaders (transformers' quantizer, the FSDP and pipeline loader) quantize."""
        return quantize_groupwise(weight.float().contiguous(), self.bits, self.group_size)

    @torch.no_grad()
    def set_quantized(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Store integer codes [out, in] (unpacked, within +-qmax) and their float32 group scales,
        e.g. the result of a calibration (LKD) that chose the scales itself."""
        qmax = qmax_for(self.bits)
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ValueError(f"codes must be [{self.out_features}, {self.in_features}], got {tuple(codes.shape)}")
        if tuple(scales.shape) != tuple(self.weight_scale.shape):
            raise ValueError(f"scales must be {tuple(self.weight_scale.shape)}, got {tuple(scales.shape)}")
        if codes.is_floating_point() or int(codes.abs().max()) > qmax:
            raise ValueError(f"codes must be integers in [-{qmax}, {qmax}] for bits={self.bits}")
        codes = codes.to(torch.int8)
        self.weight.data = (codes if self.bits == 8 else pack_int4(codes)).to(self.weight.device)
        self.weight_scale = scales.detach().to(self.weight.device, torch.float32).contiguous()

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float [out, in] weight the codes stand for."""
        return dequantize_groupwise(
            self.weight, self.weight_scale, self.bits, self.group_size, self.in_features, dtype=dtype
        )

    def _matmul(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return groupwise_linear(x2d, self.weight, self.weight_scale, bias, self.bits, self.group_size, self.act_bits)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, act_bits={self.act_bits}"
        )
