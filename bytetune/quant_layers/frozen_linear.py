"""What Int8Linear (LLM.int8()) and GroupQuantLinear (ZeroQuant) have in common: a frozen layer
whose ``weight`` holds integer codes, with a float32 ``weight_scale`` buffer and an optional frozen
``bias``. Subclasses choose the codes' layout and the autograd function of the forward."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bytetune.quant_layers.shards import local_rows, local_tensor

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FrozenQuantLinear(nn.Linear):
    """Base of the frozen quantized linear layers.

    ``weight`` is a frozen Parameter (not a buffer) and the class subclasses nn.Linear so that PEFT
    (``target_modules="all-linear"``) and transformers see a Linear. Subclasses implement
    :meth:`_matmul`, ``from_linear``, ``set_weight``, ``load_float_weight`` and
    ``dequantized_weight``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        code_shape: tuple[int, ...],
        code_dtype: torch.dtype,
        scale_shape: tuple[int, ...],
        device=None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        # nn.Linear.__init__ would allocate (and initialize) a float weight we never use.
        nn.Module.__init__(self)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.zeros(code_shape, dtype=code_dtype, device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, dtype=bias_dtype or torch.get_default_dtype(), device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)

    def _matmul(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x2d [tokens, in] @ dequant(weight).T + bias, differentiable in x2d (and bias)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if x.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"{name} takes float32/float16/bfloat16 activations, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{name} expects inputs with last dim {self.in_features}, got shape {tuple(x.shape)}")
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # As nn.Linear under autocast: compute in the autocast dtype, so the int8 epilogue
            # writes it and the backward takes the 16-bit grad-input path. The custom ops are
            # not on autocast's cast lists, so the cast happens here.
            x = x.to(torch.get_autocast_dtype(device_type))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = self._matmul(x.reshape(-1, self.in_features), bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() cast every float buffer; the scales must stay float32
        # (the kernels take float32 scales, and bf16 would round each scale by ~0.4 %).
        # Only their device follows the move, taken from the exact float32 copy.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def quantize_checkpoint_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [out, in] in the layer's storage layout, float32 scales) of a float weight laid
        out as the checkpoint stores it: how every checkpoint loader (transformers' quantizer, the
        FSDP and pipeline loader) quantizes, so that all of them give the same codes."""
        raise NotImplementedError

    def _as_out_in(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A checkpoint weight's shape as [out, in] (a Conv1D source stores [in, out])."""
        return shape

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor, where: str = "the checkpoint") -> None:
        """Quantize a float weight read from a checkpoint into this layer's allocated storage:
        the code rows this rank holds (all of them, unless FSDP2 sharded ``weight``) and every
        row's scales (a row's codes depend on that row alone). ``where`` names it in errors."""
        if self._as_out_in(tuple(weight.shape)) != (self.out_features, self.in_features):
            raise ValueError(f"{where} has shape {tuple(weight.shape)}, the model expects "
                             f"[{self.out_features}, {self.in_features}]")
        codes, scales = self.quantize_checkpoint_weight(weight.to(self.weight_scale.device))
        start, end = local_rows(self.weight)
        local_tensor(self.weight).copy_(codes[start:end])
        self.weight_scale.copy_(scales)

    @torch.no_grad()
    def load_from_checkpoint(self, read: Callable[[str], torch.Tensor], where: str) -> list[torch.Tensor]:
        """Fill this allocated layer from a float checkpoint: ``read("weight")`` is the float
        weight stored for it; ``where`` names its tensors in errors, ``{}`` standing for the
        tensor's name (``"model.layers.0.mlp.up_proj.{} in DIR"``). Returns the tensors filled;
        the bias, stored as it is held, is the loader's to copy."""
        self.load_float_weight(read("weight"), where=where.format("weight"))
        return [self.weight, self.weight_scale]

    def _check_float_weight(self, weight: torch.Tensor) -> None:
        # Against [out, in], not self.weight.shape: packed codes (INT4) are narrower.
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit a layer of [{self.out_features}, {self.in_features}]"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype != self.weight.dtype:
            # Copying a float weight into integer storage would silently truncate it.
            name = type(self).__name__
            error_msgs.append(
                f"{prefix}weight is {weight.dtype}, this {name} loads {self.weight.dtype} codes with their "
                f"{prefix}weight_scale; quantize a float layer with {name}.from_linear instead"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
