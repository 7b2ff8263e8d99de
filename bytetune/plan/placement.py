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
fewer blocks. FSDP2 (``parallel="fsdp"``, one process per device): see :meth:`Planner.fsdp_plan`;
a pipeline (``parallel="pipeline"``, one process per device, each a stage of contiguous blocks):
:meth:`Planner.pipeline_plan` and bytetune/plan/pipeline.py. :meth:`Planner.throughput_model`
sets the three side by side on the same GPUs (bytetune/plan/throughput.py).
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
from bytetune.plan.pipeline import StageModel
from bytetune.plan.report import DevicePlan, MemoryPlan, as_gib
from bytetune.plan.spec import PlanSpec, spec_from_recipe
from bytetune.quant_layers.int8_experts import is_fused_experts
from bytetune.plan.throughput import (
    DEFAULT_EFFICIENCY,
    DEFAULT_GPU,
    DEFAULT_LINK,
    StrategySpeed,
    ThroughputModel,
    device_map_speed,
    gpu_kind,
    link_bandwidth,
    interleaved_pipeline_step,
    pipeline_step,
    token_flops,
)


class Planner:
    """Holds the meta model and the activation trace of one spec, so several device sets are cheap."""

    def __init__(self, spec: PlanSpec, model: nn.Module | None = None, trace=None):
        """``model`` (the meta model) and ``trace`` (its activation trace) may come from another
        planner of the same model and sequence, to spare building them again."""
        self.spec = spec
        self.model = model if model is not None else build_meta_model(spec.model_config, spec.compute_dtype)
        self.costs = weight_costs(self.model, spec)
        self.trace = trace if trace is not None else trace_activations(spec)
        self._stage_model = None
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
        if self.spec.parallel == "pipeline":
            return self.pipeline_plan(devices)
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

    @property
    def stage_model(self) -> StageModel:
        if self._stage_model is None:
            self._stage_model = StageModel(self)
        return self._stage_model

    def pipeline_plan(self, devices: list[Device]) -> MemoryPlan:
        """A pipeline, one process per device, stage k on device k (bytetune/plan/pipeline.py)."""
        stage_model = self.stage_model
        stages = stage_model.balanced_split(devices)
        spec = self.spec
        per_rank = spec.pipeline_stages_per_rank
        if per_rank > 1:  # interleaved 1F1B: device r runs stages r, r+p, ...
            plans = [stage_model.rank_plan(d, r, len(devices), stages) for r, d in enumerate(devices)]
        else:
            plans = [stage_model.stage_plan(d, k, len(devices), run.start, len(run))
                     for k, (d, run) in enumerate(zip(devices, stages))]
        notes = [
            f"pipeline ({spec.pipeline_schedule}) over {len(devices)} stage(s), one process per device: 'in fl' is "
            "the micro-batches between their forward and backward on a stage (1F1B: min(m, p-k); GPipe: m), "
            "each keeping its blocks' inputs under checkpointing; 'bufs' the receive buffers "
            "torch.distributed.pipelining allocates for every micro-batch (input, output gradient)"
        ] if per_rank == 1 else [
            f"pipeline (interleaved_1f1b) over {len(devices)} devices x {per_rank} stages, one process per device, "
            f"device r running stages r, r+{len(devices)}, ...: 'in fl' is the (micro-batch, stage) pairs between "
            "forward and backward at the device's peak, from torch's ScheduleInterleaved1F1B order; 'bufs' the "
            "receive buffers of each of its stages, for every micro-batch"
        ]
        table = as_gib(stage_model.table_bytes)
        if stage_model.tied and (len(devices) > 1 or stage_model.cpu_embeddings):
            notes.append(f"the head is tied to the embeddings: the last stage holds its own copy of the table "
                         f"({table} GiB, frozen)")
        if stage_model.cpu_embeddings:
            notes.append(f"the first stage keeps the embedding table ({table} GiB) in host memory "
                         "(parallel.pipeline.cpu_embeddings) and sends only the looked-up rows to its GPU")
        device_map: dict[str, object] = {}
        for device, plan in zip(devices, plans):
            device_map.update({unit: device.accelerate_key for unit in plan.units})
        if stage_model.cpu_embeddings:
            device_map[self.embed_unit] = "cpu"  # the first process's host memory
        return MemoryPlan(
            spec=spec,
            devices=plans,
            device_map=device_map,
            unplaced=[],
            totals=self.totals(),
            activations_with_checkpointing=self.activations(True),
            activations_without_checkpointing=self.activations(False),
            notes=notes,
            parallel="pipeline",
            fused_loss=self.trace.loss.fused,
            stages=stages,
        )

    def throughput_model(self, devices: str | Sequence[Device], gpu: str = DEFAULT_GPU, link: str = DEFAULT_LINK,
                         efficiency: float = DEFAULT_EFFICIENCY, pipeline: MemoryPlan | None = None) -> ThroughputModel:
        """device_map, pipeline and FSDP2 of this spec on ``devices`` (all of kind ``gpu``), side by
        side: each one's memory verdict and its modelled step (bytetune/plan/throughput.py).

        Every strategy runs the same sequences per optimizer step: m = spec.micro_batches
        micro-batches (FSDP2: ceil(m / N) on each of its N ranks)."""
        devices = parse_devices(devices)
        if not 0 < efficiency <= 1:
            raise ValueError(f"efficiency={efficiency}: give the fraction of the peak reached, in (0, 1]")
        kind = gpu_kind(gpu)
        bandwidth = link_bandwidth(link, kind)
        rate = efficiency * kind.bf16_tflops * 1e12
        spec = self.spec
        per_block, head = self.stage_model.flops()
        tokens = spec.micro_batch * spec.seq_len
        m = spec.micro_batches
        hidden = self.trace.block_input  # bytes crossing a stage boundary per micro-batch
        per_token = sum(per_block) + head
        # The fused loss is off under FSDP2, so its planner traces again; the others share this trace.
        same = dict(model=self.model, trace=self.trace)
        speeds = []

        def min_headroom(plan: MemoryPlan) -> int:
            return min(d.headroom for d in plan.devices)

        # device_map: one process, one GPU at a time
        dm_plan = self.plan(devices) if spec.parallel == "none" else \
            Planner(dataclasses.replace(spec, parallel="none"), **same).plan(devices)
        used = sum(1 for d in dm_plan.devices if d.units)
        compute, comm = device_map_speed(per_token, tokens, m, max(used - 1, 0), hidden, rate, bandwidth)
        step = compute + comm
        speeds.append(StrategySpeed(
            "device_map", dm_plan.fits, min_headroom(dm_plan), used, m * tokens, compute, comm, step,
            1 - compute / (len(devices) * step), m * max(used - 1, 0) * 2 * hidden,
            f"one process; the {used} GPUs run the blocks one after another, each busy 1/{used} of the time"))

        # pipeline: stage k runs its blocks (and the head on the last) on each micro-batch in turn
        pp_plan = pipeline or (self.plan(devices) if spec.parallel == "pipeline" else
                               Planner(dataclasses.replace(spec, parallel="pipeline"), **same).plan(devices))
        n_stages = len(pp_plan.stages)
        p, v = len(pp_plan.devices), spec.pipeline_stages_per_rank
        stage_compute = [tokens * (sum(per_block[r.start:r.stop]) + (head if k == n_stages - 1 else 0)) / rate
                         for k, r in enumerate(pp_plan.stages)]
        stage_comm = [((k > 0) + (k < n_stages - 1)) * hidden / bandwidth for k in range(n_stages)]
        if v > 1:
            # a device's time per micro-batch is its V stages' together (bytetune.plan.throughput)
            rank_compute = [sum(stage_compute[r::p]) for r in range(p)]
            rank_comm = [sum(stage_comm[r::p]) for r in range(p)]
            step, compute, comm = interleaved_pipeline_step(rank_compute, rank_comm, m, v)
            shape = (f"interleaved_1f1b, {m} micro-batches over {p} devices x {v} stages (idle (p-1)/(V*m+p-1) = "
                     f"{(p - 1) / (v * m + p - 1):.0%} when balanced)")
        else:
            step, compute, comm = pipeline_step(stage_compute, stage_comm, m)
            shape = (f"{spec.pipeline_schedule}, {m} micro-batches over {p} stages (idle (p-1)/(m+p-1) = "
                     f"{(p - 1) / (m + p - 1):.0%} when balanced)")
        speeds.append(StrategySpeed(
            "pipeline", pp_plan.fits, min_headroom(pp_plan), p, m * tokens, compute, comm, step,
            1 - m * sum(stage_compute) / (p * step), m * 2 * hidden * v,
            f"{shape}; {as_mib(hidden)} MiB of hidden states per micro-batch "
            f"and boundary, forward and backward, not overlapped"))

        # FSDP2: every rank runs the whole model on its own micro-batches, gathering the weights
        fsdp = Planner(dataclasses.replace(spec, parallel="fsdp"), model=self.model)
        fs_plan = fsdp.plan(devices)
        world = len(devices)
        share = (world - 1) / world  # what a rank receives of an all-gather / sends of a reduce-scatter

        def unsharded(cost) -> int:
            return cost.quantized_weights - cost.quantized_scales + cost.other_weights + cost.lora_params

        block_bytes = sum(unsharded(fsdp.costs[b]) for b in fsdp.block_names)
        root_bytes = sum(unsharded(c) for key, c in fsdp.costs.items() if key not in fsdp.block_set)
        lora_grads = sum(c.lora_grads for c in fsdp.costs.values())
        # With reshard_after_forward each block is gathered for its forward and again for its
        # backward, where the checkpointed recompute uses that gather (FSDP2's pre-backward hook
        # unshards; its pre-forward skips during the backward); without it, once.
        gathers = 2 if spec.reshard_after_forward else 1
        per_rank = -(-m // world)
        micro_compute = tokens * per_token / rate
        micro_comm = gathers * block_bytes * share / bandwidth
        once = (root_bytes + lora_grads) * share / bandwidth  # root gathered once; gradients reduced once
        compute = per_rank * micro_compute
        comm = per_rank * micro_comm + once
        step = per_rank * max(micro_compute, micro_comm) + once
        speeds.append(StrategySpeed(
            "fsdp2", fs_plan.fits, min_headroom(fs_plan), world, per_rank * world * tokens, compute, comm, step,
            1 - compute / step, int(per_rank * gathers * block_bytes * share + root_bytes * share + lora_grads * share),
            f"{per_rank} micro-batch(es) per rank; all-gathers {as_gib(block_bytes)} GiB of block weights "
            f"{gathers}x per micro-batch ({'forward, backward with its recompute' if gathers == 2 else 'once'}), "
            f"overlapped with compute (the optimistic bound: max of the two)"))
        sm = self.stage_model  # the first block's terms, for the printed formula
        flops = token_flops([(sm.block_weights[0], 1)], sm.block_lora[0], spec.seq_len, sm.query_features,
                            sm.head_shape, spec.gradient_checkpointing)
        return ThroughputModel(kind, link, bandwidth, efficiency, flops, speeds)

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
        if self.spec.parallel == "pipeline":
            # a stage holds at least one block; interleaved 1F1B runs V stages per device
            limit = min(limit, len(self.block_names) // self.spec.pipeline_stages_per_rank)
        elif not fsdp:
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


def as_mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def _unit_of(units: list[str], name: str) -> str:
    """The placement unit holding module or parameter ``name``."""
    for unit in units:
        if name == unit or name.startswith(unit + "."):
            return unit
    raise ValueError(f"{name!r} is in no placement unit")


def plan_memory(config, devices: str | Sequence[Device], find_min: bool = True, parallel: str | None = None,
                nodes: int = 1, throughput: bool | None = False, gpu: str | None = None, link: str | None = None,
                efficiency: float | None = None) -> MemoryPlan:
    """Plan a fine-tune's memory on ``devices`` ('8x24GiB', 'cpu:24GiB' or Device objects).

    ``config`` is a recipe (the trainer's config) or a :class:`PlanSpec`. Nothing is loaded: the
    model is built on the meta device from its config. ``parallel`` ("none" / "fsdp" /
    "pipeline") replaces the spec's; ``nodes``: machines, each with ``devices`` (FSDP2 only: a
    device map stays in one process, on one machine). ``throughput``: True adds the modelled
    throughput of device_map, pipeline and FSDP2 on those GPUs (``plan.throughput``; ``gpu``, a
    kind of bytetune.plan.throughput.GPU_KINDS, ``link`` and ``efficiency`` set it); None adds it
    to a pipeline plan on GPUs, or when any of the three is given.
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
    asked = gpu is not None or link is not None or efficiency is not None
    modelled = bool(throughput) or asked or (throughput is None and spec.parallel == "pipeline")
    if modelled and any(d.kind != "cuda" for d in devices):
        if throughput is None and not asked:
            modelled = False  # a CPU pipeline (tests over gloo): memory only
        else:
            raise ValueError("the throughput model (gpu=, link=, efficiency=) is for GPUs: give gpus=COUNTxSIZE")
    if modelled:  # check the model's arguments before the slow part
        kind = gpu_kind(gpu or DEFAULT_GPU)
        link_bandwidth(link or DEFAULT_LINK, kind)
    planner = Planner(spec)
    plan = planner.plan(devices)
    plan.nodes = nodes
    if find_min:
        first = plan.devices[0].device
        plan.min_devices = planner.find_min_devices(first.capacity, first.kind)
    if modelled:
        plan.throughput = planner.throughput_model(
            devices, gpu or DEFAULT_GPU, link or DEFAULT_LINK,
            DEFAULT_EFFICIENCY if efficiency is None else efficiency,
            pipeline=plan if spec.parallel == "pipeline" else None)
    return plan


def pipeline_stages(config, num_stages: int, devices: str | Sequence[Device] | None = None) -> list[range]:
    """The blocks of each pipeline stage, as the planner places them: ``num_stages`` contiguous
    runs of block indices (``model.layers[run]``), stage k on pipeline rank k, every stage at
    least one block.

    ``config``: a recipe or a :class:`PlanSpec` (its schedule and micro-batches count: they set
    each stage's activations in flight). ``devices``: the GPUs of the stages ('8x24GiB' or Device
    objects, one per stage); the split is the fastest (least FLOPs on the busiest stage) of those
    that fit, with the most headroom among equals, or when none fits the one closest to fitting.
    None: no memory limit, so the fastest split with the least memory on its fullest stage.
    Interleaved 1F1B (the spec's ``pipeline_stages_per_rank`` V > 1): ``num_stages`` is p*V,
    ``devices`` the p GPUs, and the runs are in stage order (GPU r runs runs r, r+p, ...).
    """
    spec = config if isinstance(config, PlanSpec) else spec_from_recipe(config)
    spec = dataclasses.replace(spec, parallel="pipeline")
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages}: give 1 or more")
    per_rank = spec.pipeline_stages_per_rank  # interleaved 1F1B: num_stages = p * V, V per device
    if num_stages % per_rank:
        raise ValueError(f"num_stages={num_stages} with {per_rank} stages per device: give a multiple of {per_rank}")
    if devices is None:
        devices = [Device(f"cuda:{i}", 2**62) for i in range(num_stages // per_rank)]  # no limit
    devices = parse_devices(devices)
    if len(devices) * per_rank != num_stages:
        raise ValueError(f"{len(devices)} devices for {num_stages} stages: give one device per "
                         + ("stage" if per_rank == 1 else f"{per_rank} stages"))
    return Planner(spec).plan(devices).stages
