"""Layer-by-layer knowledge distillation (LKD, ZeroQuant arXiv 2206.01861).

For each decoder layer in turn: the float teacher layer and its quantized student see the same
hidden states (produced by the already-quantized layers before it), and the student's learnable
group scales (and optionally its weights, through a straight-through estimator on the rounding)
minimize the MSE between the two outputs. Then the student becomes GroupQuantLinear layers and
its outputs feed the next layer. No labels: any unlabeled text (or random tokens) works. Only one
layer's teacher (a float copy) is in memory on top of the model.

API: :func:`run_lkd` (a loaded model + calibration batches) and :func:`save_calibrated` (a
transformers checkpoint with a ZeroQuantConfig: ``AutoModelForCausalLM.from_pretrained`` reloads
it, the trainer fine-tunes it). Loading models and calibration text live in ``bytetune.loaders``,
the command line in ``bytetune.cli_lkd`` (``python -m bytetune.lkd``).
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.quantizers.quantizers_utils import should_convert_module

from bytetune.kernels.dispatch import round_half_away
from bytetune.kernels.groupwise import DEFAULT_GROUP_SIZE, expand_group_scales, qmax_for, quantize_tokenwise_step
from bytetune.quant_layers.blocks import decoder_block_list
from bytetune.quant_layers.convert import default_skip_names, mark_kbit_loaded
from bytetune.quant_layers.group_linear import GroupQuantLinear
from bytetune.quant_layers.zeroquant import (
    DEFAULT_BITS,
    DEFAULT_MODULE_BITS,
    bits_for,
    is_float_linear,
    quantize_model_zeroquant,
)
from bytetune.quant_layers.zeroquant_hf import ZeroQuantConfig


@dataclass
class LKDConfig:
    """What LKD quantizes and how hard it tries.

    ``act_bits``: activations of the calibrated layers (16 = W4/8-A16, 8 = W4/8-A8; with 8 the
    student sees token-wise INT8 activations through a straight-through estimator).
    ``lr``: Adam step on each group scale's relative factor (scale = absmax scale * (1 + f)).
    ``weight_lr``: Adam step on the float weights behind the codes, trained through a
    straight-through estimator on the rounding (0 = learn the scales only).
    """

    module_bits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MODULE_BITS))
    default_bits: int = DEFAULT_BITS
    group_size: int = DEFAULT_GROUP_SIZE
    act_bits: int = 16
    steps: int = 20
    lr: float = 1e-3
    weight_lr: float = 1e-4
    skip: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {self.act_bits}")


@dataclass
class LayerReport:
    index: int
    mse_before: float  # student with absmax scales, before any step
    mse_after: float
    seconds: float


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    # The weight kernels' rounding, so the saved codes are exactly what the student trained with.
    return v + (round_half_away(v) - v).detach()


class FakeQuantLinear(nn.Module):
    """A linear layer whose forward uses the group-wise quantized weight it will be saved as,
    differentiable in the group scales (LSQ-style) and optionally in the weight (STE)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, act_bits: int, train_weight: bool) -> None:
        super().__init__()
        self.bits, self.group_size, self.act_bits = bits, group_size, act_bits
        self.qmax = qmax_for(bits)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        reference = GroupQuantLinear.from_linear(linear, bits=bits, group_size=group_size, act_bits=act_bits)
        self.register_buffer("scale_init", reference.weight_scale.clone())
        self.scale_factor = nn.Parameter(torch.zeros_like(self.scale_init))
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=train_weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def scales(self) -> torch.Tensor:
        # Kept positive: a factor below -1 would flip every code's sign.
        return self.scale_init * (1 + self.scale_factor).clamp_min(1e-3)

    def codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        scales = self.scales()
        step = expand_group_scales(scales, self.group_size, self.in_features)
        codes = _round_ste(self.weight / step).clamp(-self.qmax, self.qmax)
        return codes, scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scales = self.codes_and_scales()
        weight = codes * expand_group_scales(scales, self.group_size, self.in_features)
        if self.act_bits == 8:
            # The saved layer's own token-wise quantization, so the student sees its activations;
            # straight-through for the gradient.
            codes, x_scale = quantize_tokenwise_step(x.detach().reshape(-1, self.in_features))
            x = x + ((codes * x_scale[:, None]).reshape(x.shape).to(x.dtype) - x).detach()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)

    @torch.no_grad()
    def to_group_quant_linear(self) -> GroupQuantLinear:
        codes, scales = self.codes_and_scales()
        layer = GroupQuantLinear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            bits=self.bits,
            group_size=self.group_size,
            act_bits=self.act_bits,
            device=self.weight.device,
            bias_dtype=None if self.bias is None else self.bias.dtype,
        )
        layer.set_quantized(codes.to(torch.int8), scales.float())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks (Llama ``model.layers``, Bloom/GPT-2 ``transformer.h``),
    by the rule the planner, FSDP and the pipeline use (bytetune.quant_layers.blocks)."""
    return decoder_block_list(model)[1]


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, first_layer: nn.Module, batches: list[torch.Tensor]) -> list[tuple]:
    """(hidden_states, other args, kwargs) that ``first_layer`` receives for each batch; the
    model's forward is cut there."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args[0], args[1:], kwargs))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for input_ids in batches:
            try:
                model(input_ids=input_ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("the first decoder layer was not called: is decoder_layers(model) the right stack?")
    return captured


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _run_layer(layer: nn.Module, inputs: tuple) -> torch.Tensor:
    hidden, args, kwargs = inputs
    return _layer_output(layer(hidden, *args, **kwargs))


def run_lkd(
    model: nn.Module,
    batches: list[torch.Tensor],
    config: LKDConfig | None = None,
    log: Callable[[str], None] = print,
) -> list[LayerReport]:
    """Quantize ``model``'s decoder layers in place, one after another, with LKD.

    ``batches``: token id tensors [batch, seq] (calibration data; labels are not used). Linear
    layers outside the decoder blocks, other than the head and tied layers, are quantized
    group-wise without calibration. Returns one report per layer.
    """
    config = config or LKDConfig()
    layers = decoder_layers(model)
    layers_prefix = next(name for name, module in model.named_modules() if module is layers)
    never_quantize = default_skip_names(model)
    states = capture_first_layer_inputs(model, layers[0], batches)
    reports = []
    for index, layer in enumerate(layers):
        start = time.perf_counter()
        teacher = copy.deepcopy(layer).eval().requires_grad_(False)
        with torch.no_grad():
            targets = [_run_layer(teacher, state) for state in states]
        del teacher  # only its outputs are needed from here on

        students = _swap_in_fake_quant(layer, f"{layers_prefix}.{index}", config, never_quantize)
        frozen = [(p, p.requires_grad) for p in layer.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        scale_params = [s.scale_factor for s in students.values()]
        weight_params = [s.weight for s in students.values()]
        for p in scale_params:
            p.requires_grad_(True)
        groups = [{"params": scale_params, "lr": config.lr}]
        if config.weight_lr > 0:
            for p in weight_params:
                p.requires_grad_(True)
            groups.append({"params": weight_params, "lr": config.weight_lr})

        mse_before = _mean_mse(layer, states, targets)
        initial = [p.detach().clone() for p in scale_params + weight_params]
        if students and config.steps > 0:
            optimizer = torch.optim.Adam(groups)
            for step in range(config.steps):
                state, target = states[step % len(states)], targets[step % len(states)]
                loss = F.mse_loss(_run_layer(layer, state).float(), target.float())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        mse_after = _mean_mse(layer, states, targets)
        if mse_after > mse_before:
            # A few steps on little data can overshoot (seen on SmolLM2's layer 29, whose
            # activations are orders of magnitude larger): keep the plain quantization then.
            with torch.no_grad():
                for p, value in zip(scale_params + weight_params, initial):
                    p.copy_(value)
            mse_after = _mean_mse(layer, states, targets)
        del initial

        for name, student in students.items():
            layer.set_submodule(name, student.to_group_quant_linear())
        remaining = set(layer.parameters())  # the float linears' weights are gone by now
        for p, was in frozen:
            if p in remaining:
                p.requires_grad_(was)
        with torch.no_grad():
            states = [(_run_layer(layer, state),) + tuple(state[1:]) for state in states]
        del targets
        report = LayerReport(index, mse_before, mse_after, time.perf_counter() - start)
        reports.append(report)
        log(
            f"lkd layer {index + 1}/{len(layers)}: mse {mse_before:.3e} -> {mse_after:.3e} "
            f"({len(students)} linear layers, {report.seconds:.1f} s)"
        )
    # Whatever lies outside the blocks (rare: most models keep only the head there) gets plain
    # group-wise quantization.
    quantize_model_zeroquant(
        model,
        module_bits=config.module_bits,
        default_bits=config.default_bits,
        group_size=config.group_size,
        act_bits=config.act_bits,
        skip=list(config.skip),
    )
    mark_kbit_loaded(model)
    return reports


def _swap_in_fake_quant(layer: nn.Module, prefix: str, config: LKDConfig, never_quantize: set[str]) -> dict:
    students = {}
    names = [name for name, module in layer.named_modules() if name and is_float_linear(module)]
    for name in names:
        full_name = f"{prefix}.{name}"
        if full_name in never_quantize or not should_convert_module(full_name, list(config.skip)):
            continue
        bits = bits_for(full_name, config.module_bits, config.default_bits)
        student = FakeQuantLinear(
            layer.get_submodule(name), bits, config.group_size, config.act_bits, train_weight=config.weight_lr > 0
        )
        layer.set_submodule(name, student)
        students[name] = student
    return students


@torch.no_grad()
def _mean_mse(layer: nn.Module, states: list[tuple], targets: list[torch.Tensor]) -> float:
    losses = [F.mse_loss(_run_layer(layer, s).float(), t.float()).item() for s, t in zip(states, targets)]
    return sum(losses) / max(len(losses), 1)


# ----------------------------------------------------------------------------------------------
# Saving: a transformers checkpoint with a ZeroQuantConfig, reloaded by from_pretrained
# ----------------------------------------------------------------------------------------------


def zeroquant_config_for(model: nn.Module, config: LKDConfig) -> ZeroQuantConfig:
    """The ZeroQuantConfig under which ``from_pretrained`` rebuilds exactly the model's calibrated
    layers: each GroupQuantLinear with its bits, group size and activation bits, every other
    linear layer float.

    LKD's own patterns (``config.module_bits``) are written when they give every layer its bits;
    otherwise each layer is named by an anchored pattern. Float linear layers that LKD left alone
    (``config.skip``) are listed in ``skip_modules``."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, GroupQuantLinear)}
    if not quantized:
        raise ValueError("the model has no GroupQuantLinear layers: run run_lkd on it first")
    group_sizes = {m.group_size for m in quantized.values()}
    act_bits = {m.act_bits for m in quantized.values()}
    if len(group_sizes) > 1 or len(act_bits) > 1:
        raise ValueError(
            f"one ZeroQuantConfig holds one group size and activation width; the model has group sizes "
            f"{sorted(group_sizes)} and act_bits {sorted(act_bits)}"
        )
    # config.json stores the patterns sorted, and the first matching pattern wins: check that order.
    module_bits = dict(sorted(config.module_bits.items()))
    if any(bits_for(name, module_bits, config.default_bits) != m.bits for name, m in quantized.items()):
        module_bits = {f"^{re.escape(name)}$": m.bits for name, m in quantized.items()}
    float_linears = [name for name, m in model.named_modules() if name and is_float_linear(m)]
    skip = list(config.skip) + [re.escape(name) for name in float_linears if should_convert_module(name, config.skip)]
    if not all(should_convert_module(name, skip) for name in quantized):
        # a skip pattern of LKD's that also names a calibrated layer: name the float layers exactly
        skip = [re.escape(name) for name in float_linears]
    return ZeroQuantConfig(
        module_bits=module_bits,
        default_bits=config.default_bits,
        group_size=group_sizes.pop(),
        act_bits=act_bits.pop(),
        skip_modules=skip,
    )


def save_calibrated(
    model: nn.Module, out_dir: str | Path, config: LKDConfig, tokenizer=None, report: dict | None = None
) -> Path:
    """Write the calibrated model with ``save_pretrained`` (codes and scales as they are, and a
    ``quantization_config`` that rebuilds its layers), its tokenizer, and ``lkd_report.json``.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` reloads it in any process that imported
    bytetune (which registers the ``bytetune_zeroquant`` method)."""
    out = Path(out_dir)
    model.config.quantization_config = zeroquant_config_for(model, config)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "lkd_report.json").write_text(json.dumps(report or {}, indent=1))
    return out
