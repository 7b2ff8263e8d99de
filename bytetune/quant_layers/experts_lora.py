"""LoRA on int8 MoE experts through PEFT's ``target_parameters`` (its ParamWrapper).

PEFT's ParamWrapper adapts a 3-D expert parameter by parametrizing it: while the wrapped module
runs, the parameter reads as ``W + delta``. On Int8Experts that would add a float delta to int8
codes. :class:`LoraInt8Experts` keeps ParamWrapper's adapter weights (same names, shapes and
layout, so a saved adapter is a plain PEFT adapter that loads onto the float model) and applies
them as a low-rank term added to each expert product inside the int8 forward
(:attr:`Int8Experts.lora_hooks`): for the rows routed to expert e,
``y += scaling * (x @ A_e.T) @ B_e.T``. Merging dequantizes, adds the delta and requantizes.

Layout (PEFT's): ``lora_A.weight [E * r, in]`` holds expert e's A in rows ``e*r:(e+1)*r``;
``lora_B.weight [out, r * E]`` holds B_e's column j at ``j * E + e``.

Dropout: PEFT's ParamWrapper refuses ``lora_dropout > 0`` (the dropped input cannot be factored
out of a weight parametrization), so an adapter trained with dropout here would not reload in
plain PEFT; the recipe validation refuses it in one line instead (bytetune.recipe.schema).
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import check_adapters_to_merge

from bytetune.quant_layers.int8_experts import Int8Experts


class LoraInt8Experts(ParamWrapper):
    """PEFT's ParamWrapper on one parameter of an Int8Experts; nested once per parameter, as
    PEFT nests its own wrappers."""

    def _lora_term(self, x: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        """The active adapters' term for rows ``x`` [R, in] of experts ``row_expert`` [R]."""
        experts = self.num_experts
        term = None
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            a = self.lora_A[adapter].weight  # [E * r, in]
            b = self.lora_B[adapter].weight  # [out, r * E], column j * E + e
            r = a.shape[0] // experts
            z = self.lora_dropout[adapter](x.to(a.dtype)) @ a.t()  # every expert's A: [R, E * r]
            # keep each row's own expert block; B reordered to expert-major columns to match
            keep = torch.nn.functional.one_hot(row_expert, experts).to(z.dtype)
            z = (z.view(-1, experts, r) * keep[:, :, None]).reshape(-1, experts * r)
            b_expert_major = b.view(b.shape[0], r, experts).transpose(1, 2).reshape(b.shape[0], experts * r)
            part = (z @ b_expert_major.t()) * self.scaling[adapter]
            term = part if term is None else term + part
        return term if term is not None else x.new_zeros(x.shape[0], self.out_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not any(a in self.lora_A for a in self.active_adapters):
            return self.base_layer(x, *args, **kwargs)
        hooks = self.get_base_layer().lora_hooks[self.parameter_name]
        hooks.append(self._lora_term)
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            hooks.remove(self._lora_term)

    @torch.no_grad()
    def _add_delta(self, adapter: str, sign: float, safe: bool) -> None:
        base: Int8Experts = self.get_base_layer()
        weight = base.dequantized_weight(self.parameter_name, torch.float32)
        weight += sign * self.get_delta_weight(adapter).float().to(weight.device)
        if safe and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs/infs in the merged expert weight: adapter {adapter!r} seems to be broken")
        base.set_weight(self.parameter_name, weight)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize -> add the delta -> requantize (one rounding of the expert weights)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_A:
                self._add_delta(adapter, 1.0, safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._add_delta(adapter, -1.0, False)


# PEFT nests a second parameter's wrapper only inside a module whose class is *named*
# "ParamWrapper" (tuners_utils checks the class name, not isinstance): keep that name.
LoraInt8Experts.__name__ = "ParamWrapper"


def register_experts_lora(config: LoraConfig) -> LoraConfig:
    """Make PEFT wrap the parameters of Int8Experts with LoraInt8Experts under this config."""
    config._register_custom_module({Int8Experts: LoraInt8Experts})
    return config
