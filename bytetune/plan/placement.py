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

Placement (one process, a device map): the model's placement units (its blocks whole, the modules
around them; a tied head beside its embeddings) go to the devices in execution order, each device
filled while its total (weights, LoRA, states, activations, its temporaries, runtime overhead)
stays under its capacity less a reserve; the largest reserve with which every unit is placed is
found by bisection. That balances the devices: the one holding the embeddings and the loss gets
fewer blocks. FSDP2 (``parallel="fsdp"``, one process per device): see :meth:`Planner.fsdp_plan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from torch import nn

from bytetune.plan.activations import trace_activations
from bytetune.plan.counting import weight_costs
from bytetune.plan.devices import CUDA_CONTEXT_BYTES, MiB, Device, parse_devices, runtime_overhead
from bytetune.plan.meta_model import block_list, build_meta_model, target_linears
from bytetune.quant_layers.int8_experts import is_fused_experts
from bytetune.plan.report import DevicePlan, MemoryPlan, as_gib
from bytetune.plan.spec import PlanSpec, spec_from_recipe


class Planner:
    """Holds the meta model and the activation trace of one spec, so several device sets are cheap."""

    def __init__(self, spec: PlanSpec):
        self.spec = spec
        self.model = build_meta_model(spec.model_config, spec.compute_dtype)
        self.costs = weight_costs(self.model, spec)
        self.trace = trace_activations(spec)
        blocks = block_list(self.model)
        self.block_names = [name for name, _ in blocks]
        self.block_set = set(self.block_names)
        head, embedding = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        self.units = placement_units(self.model, self.block_set)
        self.head_unit = _unit_of(self.units, self._module_name(head))
        self.embed_unit = _unit_of(self.units, self._module_name(embedding))
        # Cost keys (a parameter's module) under each placement unit.
        self.cost_keys = {unit: [] for unit in self.units}
        for key in self.costs:
            self.cost_keys[_unit_of(self.units, key)].append(key)
        # Placed together, in execution order: a tied head shares its embeddings' weight (one device).
        self.groups = [[unit] for unit in self.units]
        if head is not None and head.weight is embedding.weight and self.head_unit != self.embed_unit:
            self.groups.remove([self.head_unit])
            next(g for g in self.groups if self.embed_unit in g).append(self.head_unit)
        tr = self.trace
        self.per_block_activation = tr.block_input if spec.gradient_checkpointing else tr.per_block
        # Int8Linear's forward quantizes the input (int8, tokens x K) and may accumulate in int32
        # (tokens x N); its backward dequantizes weight tiles only, never the whole matrix.
        int8_scratch = 0
        if spec.quantization in ("int8", "zeroquant"):
            tokens = spec.micro_batch * spec.seq_len
            for linear in (m for _, m in target_linears(blocks[0][1], "all-linear")):
                int8_scratch = max(int8_scratch, tokens * (linear.in_features + 4 * linear.out_features))
            # Int8Experts: each (token, routed expert) pair is a row of the grouped GEMM.
            rows = tokens * int(getattr(spec.model_config, "num_experts_per_tok", 0) or 0)
            for module in (m for _, m in blocks[0][1].named_modules() if is_fused_experts(m)):
                _, n, k = module.gate_up_proj.shape
                int8_scratch = max(int8_scratch, rows * (k + 4 * n))
        recompute = tr.per_block if spec.gradient_checkpointing else 0
        self.block_temporary = recompute + max(tr.block_backward_scratch, int8_scratch)

    def _module_name(self, module: nn.Module) -> str:
        for name, mod in self.model.named_modules():
            if mod is module:
                return name
        raise ValueError(f"{type(module).__name__} is not a submodule of the model")

    def loss_phase(self, kind: str) -> int:
        """The loss's transient on the head's device: the after-blocks activations, what the loss
        keeps to its backward and its largest forward/backward buffers."""
        return self.trace.after_blocks + self.trace.loss.peak(kind)

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

    def _device_plan(self, device: Device, units: Sequence[str]) -> DevicePlan:
        """One device's totals when it holds the placement ``units``."""
        plan = DevicePlan(device, list(units))
        tr = self.trace
        has_blocks = False
        for unit in units:
            for key in self.cost_keys[unit]:
                cost = self.costs[key]
                plan.quantized_weights += cost.quantized_weights
                plan.other_weights += cost.other_weights
                plan.lora_params += cost.lora_params
                plan.lora_grads += cost.lora_grads
                plan.optimizer_states += cost.optimizer_states
            if unit in self.block_set:
                plan.activations += self.per_block_activation
                has_blocks = True
        # "activations" stay from the forward to their block's backward; "temporary" is the
        # largest of the phases that come and go: the loss (forward end, then its backward)
        # and one block's backward (recomputed first under checkpointing).
        if has_blocks:
            plan.activations += tr.shared  # ALiBi / masks are moved to every device with blocks
            plan.temporary = self.block_temporary
        if self.embed_unit in units:
            plan.activations += tr.before_blocks
        if self.head_unit in units:
            plan.temporary = max(plan.temporary, self.loss_phase(device.kind))
        if units:
            dynamic = plan.activations + plan.temporary
            plan.overhead = runtime_overhead(device, plan.allocated - dynamic, dynamic)
        elif device.kind == "cuda":
            plan.overhead = 0  # an unused GPU costs nothing: the process never touches it
        return plan

    def _fill(self, devices: list[Device], reserve: int) -> tuple[list[list[str]], list[str]]:
        """Units in execution order onto the devices in turn, each filled while its total stays
        under capacity - ``reserve``; returns (units per device, units left over)."""
        groups = list(self.groups)
        placed: list[list[str]] = []
        for device in devices:
            mine: list[str] = []
            while groups:
                trial = mine + groups[0]
                if self._device_plan(device, trial).total > device.capacity - reserve:
                    break
                mine = trial
                groups.pop(0)
            placed.append(mine)
        return placed, [u for g in groups for u in g]

    def plan(self, devices: str | Sequence[Device]) -> MemoryPlan:
        devices = parse_devices(devices)
        if not devices:
            raise ValueError("no devices given")
        if self.spec.parallel == "fsdp":
            return self.fsdp_plan(devices)
        # The largest reserve (bytes left free on every device) with which every unit is placed:
        # a full fill (reserve 0) that leaves units over does not fit.
        placed, left = self._fill(devices, 0)
        if not left:
            low, high = 0, max(d.capacity for d in devices)
            while high - low > MiB:
                mid = (low + high) // 2
                trial, rest = self._fill(devices, mid)
                if rest:
                    high = mid
                else:
                    low, placed = mid, trial
        device_map: dict[str, object] = {}
        for device, units in zip(devices, placed):
            device_map.update({unit: device.accelerate_key for unit in units})
        device_map.update({unit: "disk" for unit in left})  # accelerate's name for "no device"
        return MemoryPlan(
            spec=self.spec,
            devices=[self._device_plan(d, units) for d, units in zip(devices, placed)],
            device_map=device_map,
            unplaced=left,
            totals=self.totals(),
            activations_with_checkpointing=self.activations(True),
            activations_without_checkpointing=self.activations(False),
            fused_loss=self.trace.loss.fused,
        )

    def fsdp_plan(self, devices: list[Device]) -> MemoryPlan:
        """FSDP2, one process per device (``fully_shard`` per decoder block, the root last; see
        bytetune/trainer/distributed.py). Each device holds:

        - its 1/N shard of every parameter (int8 codes, unquantized weights, LoRA) and of the LoRA
          gradients and optimizer states; the quantized layers' scales are buffers, which FSDP2
          does not shard: every device keeps them all;
        - the gathered root group (embeddings, head, norms outside the blocks) for the whole
          step: FSDP2 does not reshard the root after its forward;
        - gathered blocks: with ``reshard_after_forward`` the block computing and the next one
          prefetched (two); without it every block stays gathered from its forward to its
          backward;
        - the activations of its own micro-batch through the whole model, and the larger of one
          block's backward and the loss phase (every device runs the head; the trainer's fused
          loss is off under FSDP2, so it is the full logits);
        - runtime overhead (CUDA context, allocator slack).
        """
        world = len(devices)

        def shard(n: int) -> int:
            return -(-n // world)

        blocks = [self.costs[b] for b in self.block_names]
        root = [c for key, c in self.costs.items() if key not in self.block_set]

        def unsharded(cost) -> int:  # the bytes an all-gather brings back
            return cost.quantized_weights - cost.quantized_scales + cost.other_weights + cost.lora_params

        in_flight = 2 if self.spec.reshard_after_forward else len(blocks)
        gathered_blocks = min(in_flight, len(blocks)) * max(unsharded(c) for c in blocks)
        gathered_root = sum(unsharded(c) for c in root)
        plans = []
        everything = list(self.costs.values())
        for device in devices:
            plan = DevicePlan(device, list(self.units))
            plan.quantized_weights = sum(shard(c.quantized_weights - c.quantized_scales) + c.quantized_scales
                                         for c in everything)
            plan.other_weights = sum(shard(c.other_weights) for c in everything)
            plan.lora_params = sum(shard(c.lora_params) for c in everything)
            plan.lora_grads = sum(shard(c.lora_grads) for c in everything)
            plan.optimizer_states = sum(shard(c.optimizer_states) for c in everything)
            plan.gathered = gathered_blocks + gathered_root
            plan.activations = self.activations(self.spec.gradient_checkpointing)
            plan.temporary = max(self.block_temporary, self.loss_phase(device.kind))
            dynamic = plan.activations + plan.temporary
            plan.overhead = runtime_overhead(device, plan.allocated - dynamic, dynamic)
            plans.append(plan)
        notes = [
            f"FSDP2 over {world} device(s): each holds a 1/{world} shard, the gathered root group "
            f"({as_gib(gathered_root)} GiB, kept for the step) and {min(in_flight, len(blocks))} gathered block(s) "
            f"({as_gib(gathered_blocks)} GiB); quantization scales are unsharded buffers"
        ]
        return MemoryPlan(
            spec=self.spec,
            devices=plans,
            device_map={},
            unplaced=[],
            totals=self.totals(),
            activations_with_checkpointing=self.activations(True),
            activations_without_checkpointing=self.activations(False),
            notes=notes,
            parallel="fsdp",
            fused_loss=self.trace.loss.fused,
        )

    def find_min_devices(self, size: int, kind: str = "cuda", limit: int = 512) -> int | None:
        """Smallest number of devices of ``size`` bytes on which the plan fits (None past ``limit``)."""
        if kind != "cuda":
            return 1 if self.plan([Device("cpu", size)]).fits else None
        fsdp = self.spec.parallel == "fsdp"
        everything = sum(c.static for c in self.costs.values()) + self.activations(self.spec.gradient_checkpointing)
        usable = size - CUDA_CONTEXT_BYTES - self.block_temporary
        if usable <= 0:
            return None
        n = max(1, math.ceil(everything / usable))
        if not fsdp:
            # Past one unit per device, more devices cannot help.
            limit = min(limit, len(self.units) + 1)
        if fsdp:
            # Every device holds its shard plus what no sharding shrinks (gathered root and blocks,
            # activations): monotone in the count, so bisect, once the largest count fits.
            if not self.plan(f"{limit}x{size}B").fits:
                return None
            high = limit
            while n < high:
                mid = (n + high) // 2
                if self.plan(f"{mid}x{size}B").fits:
                    high = mid
                else:
                    n = mid + 1
            return n
        while n <= limit:
            if self.plan(f"{n}x{size}B").fits:
                return n
            n += 1
        return None


def placement_units(model: nn.Module, blocks: set[str]) -> list[str]:
    """What a device map names, in execution order: every block whole, and around them the
    children of the modules that hold blocks (and their own parameters and buffers)."""
    units: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full in blocks or not any(b.startswith(full + ".") for b in blocks):
                units.append(full)
            else:
                walk(full + ".", child)
        for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            units.append(prefix + name)

    walk("", model)
    return units


def _unit_of(units: list[str], name: str) -> str:
    """The placement unit holding module or parameter ``name``."""
    for unit in units:
        if name == unit or name.startswith(unit + "."):
            return unit
    raise ValueError(f"{name!r} is in no placement unit")


def plan_memory(config, devices: str | Sequence[Device], find_min: bool = True, parallel: str | None = None,
                nodes: int = 1) -> MemoryPlan:
    """Plan a fine-tune's memory on ``devices`` ('8x24GiB', 'cpu:24GiB' or Device objects).

    ``config`` is a recipe (the trainer's config) or a :class:`PlanSpec`. Nothing is loaded: the
    model is built on the meta device from its config. ``parallel`` ("none" / "fsdp") replaces the
    spec's; ``nodes``: machines, each with ``devices`` (FSDP2 only: a device map stays in one
    process, on one machine).
    """
    spec = config if isinstance(config, PlanSpec) else spec_from_recipe(config)
    if parallel is not None:
        spec = dataclasses.replace(spec, parallel=parallel)
    devices = parse_devices(devices)
    if nodes < 1:
        raise ValueError(f"nodes={nodes}: give 1 or more machines")
    if nodes > 1:
        if spec.parallel != "fsdp":
            raise ValueError(f"nodes={nodes} needs parallel=fsdp: a device map splits the model over the GPUs "
                             "of one machine, in one process")
        if any(d.kind != "cuda" for d in devices):
            raise ValueError("nodes=N plans GPUs: give gpus=COUNTxSIZE")
        devices = [Device(f"cuda:{i}", d.capacity) for i, d in enumerate(devices * nodes)]
    planner = Planner(spec)
    plan = planner.plan(devices)
    plan.nodes = nodes
    if find_min:
        first = plan.devices[0].device
        plan.min_devices = planner.find_min_devices(first.capacity, first.kind)
    return plan
