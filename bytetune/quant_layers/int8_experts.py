"""Frozen LLM.int8() mixture-of-experts: the fused 3-D expert weights of transformers 5 in int8.

transformers 5 holds the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE
(and others built from the same template) as two stacked parameters, ``gate_up_proj
[E, 2I, H]`` and ``down_proj [E, H, I]``, in a module whose forward takes ``(hidden_states,
top_k_index, top_k_weights)``. :class:`Int8Experts` replaces such a module: the same forward and
the same parameter names and shapes, holding int8 codes (each expert row-wise, float32 scales in
``<name>_scale`` buffers). Each expert's two products are LLM.int8() over the tokens routed to it
(:mod:`bytetune.kernels.int8_experts`), with outlier columns kept in 16-bit by Int8Linear's rule.

Backward: the input gradient only (the codes are frozen), straight-through as Int8Linear's. LoRA
adapters on the experts attach through :attr:`Int8Experts.lora_hooks` (see
:mod:`bytetune.quant_layers.experts_lora`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bytetune.kernels.int8_experts import (
    dequantize_experts,
    grouped_int8_grad_input,
    grouped_int8_linear,
    quantize_experts,
    sort_by_expert,
)
from bytetune.quant_layers.frozen_linear import ACTIVATION_DTYPES
from bytetune.quant_layers.int8_linear import DEFAULT_THRESHOLD, default_outlier_capacity
from bytetune.quant_layers.shards import local_rows, local_tensor

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


class GroupedInt8Linear(torch.autograd.Function):
    """y = per-expert LLM.int8() of x (rows sorted by expert), differentiable in x."""

    @staticmethod
    def forward(ctx, x, w_int8, w_scale, offsets, threshold, outlier_capacity):
        ctx.save_for_backward(w_int8, w_scale, offsets)
        return grouped_int8_linear(x, w_int8, w_scale, offsets, threshold, outlier_capacity)

    @staticmethod
    def backward(ctx, grad_y):
        w_int8, w_scale, offsets = ctx.saved_tensors
        grad_x = grouped_int8_grad_input(grad_y.contiguous(), w_int8, w_scale, offsets) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers 5 experts module of the layout Int8Experts replaces:
    3-D ``gate_up_proj [E, 2I, H]`` (gate rows then up rows) and ``down_proj [E, H, I]``, no bias,
    an ``act_fn``. Transposed (GPT-OSS, Llama 4), biased or interleaved layouts are not it."""
    if isinstance(module, Int8Experts):
        return False
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(module, "act_fn"):
        return False
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        return False
    if not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
        return False
    if getattr(module, "has_post_expert_norm", False):
        return False
    e, two_i, h = gate_up.shape
    return two_i % 2 == 0 and tuple(down.shape) == (e, h, two_i // 2)


class Int8Experts(nn.Module):
    """Frozen int8 experts with the forward of transformers' fused experts modules.

    State: ``gate_up_proj`` int8 [E, 2I, H] and ``down_proj`` int8 [E, H, I] (frozen Parameters,
    named as in the float module so that PEFT's ``target_parameters`` finds them), float32
    ``gate_up_proj_scale`` [E, 2I] and ``down_proj_scale`` [E, H] buffers (each row's absmax).
    """

    # PEFT's ParamWrapper reads this: the weights are [experts, out, in].
    is_transposed = False

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: nn.Module,
        threshold: float = DEFAULT_THRESHOLD,
        device=None,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.threshold = float(threshold)
        shapes = {"gate_up_proj": (2 * intermediate_dim, hidden_dim), "down_proj": (hidden_dim, intermediate_dim)}
        for name, (n, k) in shapes.items():
            codes = torch.zeros(num_experts, n, k, dtype=torch.int8, device=device)
            setattr(self, name, nn.Parameter(codes, requires_grad=False))
            self.register_buffer(f"{name}_scale", torch.ones(num_experts, n, dtype=torch.float32, device=device))
        self.outlier_capacity = {name: default_outlier_capacity(k) for name, (n, k) in shapes.items()}
        # name -> callables (x_sorted, row_expert) -> a term added to that product's output: how
        # LoRA on the experts' weights enters the forward (set by the LoRA wrapper while it runs).
        self.lora_hooks: dict[str, list] = {name: [] for name in EXPERT_PARAMETERS}
        # (float class, its config): what dequantized_experts rebuilds
        self.source: tuple = (None, None)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, module: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> "Int8Experts":
        if not is_fused_experts(module):
            raise TypeError(f"{type(module).__name__} is not a fused experts module with [E, 2I, H] / [E, H, I] weights")
        e, two_i, h = module.gate_up_proj.shape
        layer = cls(e, h, two_i // 2, module.act_fn, threshold=threshold, device=module.gate_up_proj.device)
        for name in EXPERT_PARAMETERS:
            layer.set_weight(name, getattr(module, name))
        layer.source = (type(module), getattr(module, "config", None))
        layer.train(module.training)
        return layer

    @torch.no_grad()
    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Quantize a float [E, N, K] weight into parameter ``name`` (one expert at a time, so the
        float32 copy made on the way is one expert's)."""
        param = getattr(self, name)
        if tuple(weight.shape) != tuple(param.shape):
            raise ValueError(f"{name}: weight of shape {tuple(weight.shape)} does not fit {tuple(param.shape)}")
        codes = torch.empty_like(param.data)
        scale = torch.empty(param.shape[:2], dtype=torch.float32, device=param.device)
        for e in range(weight.shape[0]):
            c, s = quantize_experts(weight[e : e + 1].float())
            codes[e], scale[e] = c[0].to(param.device), s[0].to(param.device)
        param.data = codes
        setattr(self, f"{name}_scale", scale)

    @staticmethod
    @torch.no_grad()
    def quantize_checkpoint_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [E, N, K], float32 row absmax [E, N]) of a fused float expert weight read
        from a checkpoint, each expert row-wise: how the checkpoint loaders quantize."""
        return quantize_experts(weight.contiguous())

    @torch.no_grad()
    def load_float_weight(self, name: str, weight: torch.Tensor, where: str = "the checkpoint") -> None:
        """Quantize a float [E, N, K] weight read from a checkpoint into the allocated parameter
        ``name``: the experts this rank holds (all, unless FSDP2 sharded it on dim 0) and every
        expert's row scales. One expert at a time, so the float32 copy made on the way is one
        expert's (a row's codes depend on that row alone: the same codes as all at once)."""
        param, scale = getattr(self, name), getattr(self, f"{name}_scale")
        if tuple(weight.shape) != tuple(param.shape):
            raise ValueError(f"{where} has shape {tuple(weight.shape)}, the model expects {list(param.shape)}")
        start, end = local_rows(param)
        codes = local_tensor(param)
        for e in range(weight.shape[0]):
            c, s = self.quantize_checkpoint_weight(weight[e : e + 1].to(scale.device))
            scale[e] = s[0]
            if start <= e < end:
                codes[e - start] = c[0]

    @torch.no_grad()
    def load_from_checkpoint(self, read: Callable[[str], torch.Tensor], where: str) -> list[torch.Tensor]:
        """Fill this allocated module from a float checkpoint: ``read(name)`` is the fused float
        weight stored under each of :data:`EXPERT_PARAMETERS`. Returns the tensors filled."""
        filled = []
        for name in EXPERT_PARAMETERS:
            self.load_float_weight(name, read(name), where=where.format(name))
            filled += [getattr(self, name), getattr(self, f"{name}_scale")]
        return filled

    @torch.no_grad()
    def dequantized_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_experts(getattr(self, name), getattr(self, f"{name}_scale"), dtype)

    def _product(self, name: str, x: torch.Tensor, offsets: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        y = GroupedInt8Linear.apply(
            x, getattr(self, name), getattr(self, f"{name}_scale"), offsets, self.threshold, self.outlier_capacity[name]
        )
        for hook in self.lora_hooks[name]:
            y = y + hook(x, row_expert).to(y.dtype)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype not in ACTIVATION_DTYPES:
            raise TypeError(f"Int8Experts takes float32/float16/bfloat16 activations, got {hidden_states.dtype}")
        device_type = hidden_states.device.type
        x_all = hidden_states
        if torch.is_autocast_enabled(device_type):
            x_all = x_all.to(torch.get_autocast_dtype(device_type))
        top_k = top_k_index.shape[-1]
        order, offsets = sort_by_expert(top_k_index, self.num_experts)
        token = order // top_k  # the token of each sorted (token, slot) pair
        x = x_all[token]
        row_expert = top_k_index.reshape(-1)[order].clamp(0, self.num_experts - 1)
        gate, up = self._product("gate_up_proj", x, offsets, row_expert).chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        y = self._product("down_proj", h, offsets, row_expert)
        # Slots routed to no local expert (ids outside [0, E)) sort past offsets[-1]: their rows
        # are 0 in the int8 products, and their weight is 0 so that no LoRA term leaks either.
        ids = top_k_index.reshape(-1)[order]
        weights = top_k_weights.reshape(-1)[order].to(y.dtype)
        weights = torch.where((ids >= 0) & (ids < self.num_experts), weights, 0)
        y = y * weights[:, None]
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, token, y.to(out.dtype))

    def _apply(self, fn, recurse=True):
        # As FrozenQuantLinear: a model-wide .to(bfloat16) must not round the float32 scales.
        scales = {name: getattr(self, f"{name}_scale") for name in EXPERT_PARAMETERS}
        super()._apply(fn, recurse)
        for name, scale in scales.items():
            if getattr(self, f"{name}_scale").dtype != torch.float32:
                setattr(self, f"{name}_scale", scale.to(getattr(self, f"{name}_scale").device))
        return self

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, threshold={self.threshold}"
        )


@torch.no_grad()
def quantize_experts_modules(model: nn.Module, threshold: float = DEFAULT_THRESHOLD, skip=()) -> tuple[int, int]:
    """Replace every fused experts module of ``model`` by an Int8Experts, in place.
    Returns (modules replaced, expert weights now int8)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = [n for n, m in model.named_modules() if n and is_fused_experts(m) and should_convert_module(n, list(skip))]
    quantized = 0
    for name in names:
        float_module = model.get_submodule(name)
        int8_module = Int8Experts.from_experts(float_module, threshold=threshold)
        model.set_submodule(name, int8_module)
        quantized += sum(getattr(int8_module, p).numel() for p in EXPERT_PARAMETERS)
    return len(names), quantized


@torch.no_grad()
def dequantized_experts(int8_module: Int8Experts, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The float experts module Int8Experts was made from (same class, built from its config),
    holding the dequantized weights: what dequantize_model and the merged exports put back."""
    source_class, config = int8_module.source
    if source_class is None or config is None:
        raise TypeError("this Int8Experts was not made from a transformers experts module: no float class to rebuild")
    with torch.device("meta"):
        module = source_class(config)
    module.act_fn = int8_module.act_fn
    for name in EXPERT_PARAMETERS:
        setattr(module, name, nn.Parameter(int8_module.dequantized_weight(name, dtype), requires_grad=False))
    module.train(int8_module.training)
    return module


def router_names(model: nn.Module) -> set[str]:
    """Names of the MoE routers of ``model``: a block's ``gate`` beside its ``experts``, a
    ``shared_expert_gate``, any module whose class is a router. They pick the experts; they are
    neither quantized nor given LoRA by default (a small error there re-routes tokens)."""
    names = set()
    for name, module in model.named_modules():
        if "router" in type(module).__name__.lower() or name.rsplit(".", 1)[-1] == "shared_expert_gate":
            names.add(name)
        elif hasattr(module, "experts") and isinstance(getattr(module, "gate", None), nn.Module):
            names.add(f"{name}.gate" if name else "gate")
    return names
