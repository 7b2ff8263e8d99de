"""Training-memory planner: count the bytes of a LoRA fine-tune before any weight is loaded.

The model is built on the meta device from its transformers config, so a 176B-parameter model
costs no memory and a few seconds. Static memory (weights, LoRA parameters, gradients, optimizer
states) is counted exactly from the meta parameters. Activations are counted by running a short
copy of the model (two blocks, same shapes) forward on the meta device with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd keeps for the backward pass
is recorded once per storage, so the count follows the model's real code (eager attention, LoRA
branches, frozen base layers that save nothing for their weights) rather than a hand formula.
The peak is the kept activations plus the largest of the phases that come and go, each sized from
shapes: the loss (logits, log-softmax and its fp32 gradient buffers) and one block's backward
(its recomputed activations under checkpointing, attention-score and MLP gradients).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

from accelerate.utils import compute_module_sizes, infer_auto_device_map
from torch import nn

from bytetune.plan.activations import trace_activations
from bytetune.plan.counting import weight_costs
from bytetune.plan.devices import CPU_RUNTIME_BYTES, CUDA_CONTEXT_BYTES, Device, parse_devices, runtime_overhead
from bytetune.plan.meta_model import block_list, build_meta_model, target_linears
from bytetune.plan.report import DevicePlan, MemoryPlan, as_gib
from bytetune.plan.spec import PlanSpec, as_dtype, spec_from_recipe


class Planner:
    """Holds the meta model and the activation trace of one spec, so several device sets are cheap."""

    def __init__(self, spec: PlanSpec):
        self.spec = spec
        self.model = build_meta_model(spec.model_config, spec.compute_dtype)
        self.costs, self.special_dtypes = weight_costs(self.model, spec)
        self.trace = trace_activations(spec)
        blocks = block_list(self.model)
        self.block_names = [name for name, _ in blocks]
        self.head_name = self._module_name(self.model.get_output_embeddings())
        self.embed_name = self._module_name(self.model.get_input_embeddings())
        tr = self.trace
        self.per_block_activation = tr.block_input if spec.gradient_checkpointing else tr.per_block
        # Int8Linear's forward quantizes the input (int8, tokens x K) and may accumulate in int32
        # (tokens x N); its backward dequantizes weight tiles only, never the whole matrix.
        int8_scratch = 0
        if spec.quantization in ("int8", "zeroquant"):
            tokens = spec.micro_batch * spec.seq_len
            for linear in (m for _, m in target_linears(blocks[0][1], "all-linear")):
                int8_scratch = max(int8_scratch, tokens * (linear.in_features + 4 * linear.out_features))
        recompute = tr.per_block if spec.gradient_checkpointing else 0
        self.block_temporary = recompute + max(tr.block_backward_scratch, int8_scratch)

    def _module_name(self, module: nn.Module) -> str:
        for name, mod in self.model.named_modules():
            if mod is module:
                return name
        raise ValueError(f"{type(module).__name__} is not a submodule of the model")

    def totals(self) -> dict[str, int]:
        keys = ["quantized_weights", "other_weights", "lora_params", "lora_grads", "optimizer_states", "lora_numel"]
        out = {k: sum(getattr(c, k) for c in self.costs.values()) for k in keys}
        out["parameters"] = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        return out

    def activations(self, checkpointing: bool) -> int:
        tr = self.trace
        n = len(self.block_names)
        kept = n * (tr.block_input if checkpointing else tr.per_block)
        return kept + tr.shared + tr.before_blocks

    def device_plans(self, device_map: dict[str, object], devices: list[Device]) -> list[DevicePlan]:
        by_key = {d.accelerate_key: DevicePlan(d, []) for d in devices}
        tr = self.trace
        for unit, cost in self.costs.items():
            key = _placement(device_map, unit)
            if key not in by_key:
                continue
            plan = by_key[key]
            plan.units.append(unit)
            plan.quantized_weights += cost.quantized_weights
            plan.other_weights += cost.other_weights
            plan.lora_params += cost.lora_params
            plan.lora_grads += cost.lora_grads
            plan.optimizer_states += cost.optimizer_states
            if unit in self.block_names:
                plan.activations += self.per_block_activation
        # A tied head has no weights of its own (no unit), but accelerate still places it.
        head_key = _placement(device_map, self.head_name)
        embed_key = _placement(device_map, self.embed_name)
        for key, plan in by_key.items():
            # "activations" stay from the forward to their block's backward; "temporary" is the
            # largest of the phases that come and go: the loss (forward end, then its backward)
            # and one block's backward (recomputed first under checkpointing).
            if any(u in self.block_names for u in plan.units):
                plan.activations += tr.shared  # ALiBi / masks are moved to every device with blocks
                plan.temporary = self.block_temporary
            if key == embed_key:
                plan.activations += tr.before_blocks
            if key == head_key:
                loss_phase = tr.after_blocks + max(tr.logits, tr.loss_backward_scratch)
                plan.temporary = max(plan.temporary, loss_phase)
            if plan.units:
                dynamic = plan.activations + plan.temporary
                plan.overhead = runtime_overhead(plan.device, plan.allocated - dynamic, dynamic)
            elif plan.device.kind == "cuda":
                plan.overhead = 0  # an unused GPU costs nothing: the process never touches it
        return list(by_key.values())

    def plan(self, devices: str | Sequence[Device]) -> MemoryPlan:
        devices = parse_devices(devices)
        if not devices:
            raise ValueError("no devices given")
        model = self.model
        sizes = compute_module_sizes(model, dtype=as_dtype(self.spec.compute_dtype), special_dtypes=self.special_dtypes)
        largest_block = max(sizes[name] for name in self.block_names)
        accel_weights = sizes[""]
        true_weights = sum(c.quantized_weights + c.other_weights for c in self.costs.values())
        everything = sum(c.static for c in self.costs.values()) + self.activations(self.spec.gradient_checkpointing)
        # accelerate sizes modules by their weights only; give it each device's room scaled by the
        # share of weights in everything a unit costs, then correct device by device.
        ratio = accel_weights / everything
        fixed = {d.accelerate_key: self._fixed_guess(d) for d in devices}
        budget = {d.accelerate_key: max(0, int((d.capacity - fixed[d.accelerate_key]) * ratio)) for d in devices}
        device_map: dict[str, object] = {}
        plans: list[DevicePlan] = []
        for _ in range(12):
            max_memory = dict(budget)
            # accelerate keeps room for one more block on the first device in case it must offload;
            # training never offloads, so hand that room back.
            first = devices[0].accelerate_key
            max_memory[first] += largest_block
            device_map = _quiet_device_map(
                model,
                max_memory=max_memory,
                no_split_module_classes=list(model._no_split_modules),
                dtype=as_dtype(self.spec.compute_dtype),
                special_dtypes=self.special_dtypes,
            )
            plans = self.device_plans(device_map, devices)
            over = [p for p in plans if not p.fits and p.units]
            if not over:
                break
            for p in over:
                key = p.device.accelerate_key
                # Shrink by the overshoot, and at least below what the device holds now, so that
                # it gives up a whole unit (blocks only move whole).
                held = sum(sizes[name] for name, device in device_map.items() if device == key)
                budget[key] = max(0, min(budget[key] + int(p.headroom * ratio), held - 1))
        unplaced = [u for u in self.costs if _placement(device_map, u) not in {d.accelerate_key for d in devices}]
        notes = []
        if true_weights != accel_weights:
            notes.append(
                f"weights: {as_gib(true_weights)} GiB counted (quantized codes + fp32 scales); accelerate's map sized "
                f"them as {as_gib(accel_weights)} GiB"
            )
        return MemoryPlan(
            spec=self.spec,
            devices=plans,
            device_map=device_map,
            unplaced=unplaced,
            totals=self.totals(),
            activations_with_checkpointing=self.activations(True),
            activations_without_checkpointing=self.activations(False),
            notes=notes,
        )

    def _fixed_guess(self, device: Device) -> int:
        base = CUDA_CONTEXT_BYTES if device.kind == "cuda" else CPU_RUNTIME_BYTES
        return base + self.block_temporary

    def find_min_devices(self, size: int, kind: str = "cuda", limit: int = 512) -> int | None:
        """Smallest number of devices of ``size`` bytes on which the plan fits (None past ``limit``)."""
        if kind != "cuda":
            return 1 if self.plan([Device("cpu", size)]).fits else None
        everything = sum(c.static for c in self.costs.values()) + self.activations(self.spec.gradient_checkpointing)
        usable = size - CUDA_CONTEXT_BYTES - self.block_temporary
        if usable <= 0:
            return None
        n = max(1, math.ceil(everything / usable))
        # Past one unit per device, more devices cannot help.
        limit = min(limit, len(self.costs) + 1)
        while n <= limit:
            if self.plan(f"{n}x{size}B").fits:
                return n
            n += 1
        return None


def _quiet_device_map(model, **kwargs):
    """accelerate's map; its warning that planned GPUs are absent from this machine is expected here."""
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return infer_auto_device_map(model, **kwargs)
    finally:
        log.setLevel(level)


def _placement(device_map: dict[str, object], unit: str):
    """The device accelerate gave ``unit`` (the map may name it, a parent, or its children)."""
    best = None
    for name, device in device_map.items():
        if name == "" or unit == name or unit.startswith(name + "."):
            if best is None or len(name) > len(best[0]):
                best = (name, device)
    if best is not None:
        return best[1]
    children = {dev for name, dev in device_map.items() if name.startswith(unit + ".")}
    return children.pop() if len(children) == 1 else None


def plan_memory(config, devices: str | Sequence[Device], find_min: bool = True) -> MemoryPlan:
    """Plan a fine-tune's memory on ``devices`` ('8x24GiB', 'cpu:24GiB' or Device objects).

    ``config`` is a recipe (the trainer's config) or a :class:`PlanSpec`. Nothing is loaded: the
    model is built on the meta device from its config.
    """
    spec = config if isinstance(config, PlanSpec) else spec_from_recipe(config)
    planner = Planner(spec)
    plan = planner.plan(devices)
    if find_min:
        first = plan.devices[0].device
        plan.min_devices = planner.find_min_devices(first.capacity, first.kind)
    return plan
