"""A plan's result: per-device totals and verdicts (:class:`DevicePlan`, :class:`MemoryPlan`), as a
table, as advice on what would fit, or as a dict for JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from bytetune.plan.devices import GiB, Device, overhead_figures
from bytetune.plan.spec import PlanSpec, as_dtype


@dataclass
class DevicePlan:
    device: Device
    units: list[str]
    quantized_weights: int = 0
    other_weights: int = 0
    lora_params: int = 0
    lora_grads: int = 0
    optimizer_states: int = 0
    gathered: int = 0  # FSDP2: parameters all-gathered whole (root group, blocks in flight)
    buffers: int = 0  # pipeline: the stage's receive buffers (one per micro-batch of a step)
    in_flight: int = 0  # pipeline: micro-batches between their forward and backward, at most
    activations: int = 0
    temporary: int = 0
    overhead: int = 0

    @property
    def allocated(self) -> int:
        """What the framework allocates at the peak (compare with torch.cuda.max_memory_allocated)."""
        return (
            self.quantized_weights
            + self.other_weights
            + self.lora_params
            + self.lora_grads
            + self.optimizer_states
            + self.gathered
            + self.buffers
            + self.activations
            + self.temporary
        )

    @property
    def total(self) -> int:
        return self.allocated + self.overhead

    @property
    def headroom(self) -> int:
        return self.device.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def as_dict(self) -> dict:
        return {
            "device": self.device.name,
            "capacity": self.device.capacity,
            "blocks": sum(1 for u in self.units if u.rsplit(".", 1)[-1].isdigit()),
            "units": self.units,
            "quantized_weights": self.quantized_weights,
            "other_weights": self.other_weights,
            "lora_params": self.lora_params,
            "lora_grads": self.lora_grads,
            "optimizer_states": self.optimizer_states,
            "gathered": self.gathered,
            "buffers": self.buffers,
            "in_flight": self.in_flight,
            "activations": self.activations,
            "temporary": self.temporary,
            "allocated": self.allocated,
            "overhead": self.overhead,
            "total": self.total,
            "headroom": self.headroom,
            "fits": self.fits,
        }


@dataclass
class MemoryPlan:
    spec: PlanSpec
    devices: list[DevicePlan]
    device_map: dict[str, object]
    unplaced: list[str]  # units accelerate could not put on any given device
    totals: dict[str, int]  # whole-model breakdown
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    min_devices: int | None = None  # of the given size, when planned with find_min_devices
    notes: list[str] = field(default_factory=list)
    parallel: str = "none"  # "fsdp": one process per device, each holding a shard
    nodes: int = 1  # machines the devices are spread over (FSDP2)
    fused_loss: bool = False  # the loss is the trainer's fused linear+CE (else from the full logits)
    # parallel="pipeline": the blocks of each stage (indices into the model's blocks), one per device
    stages: list[range] = field(default_factory=list)
    throughput: object = None  # a bytetune.plan.throughput.ThroughputModel, when modelled

    @property
    def idle_fraction(self) -> float | None:
        """The pipeline's bubble, (p - 1) / (m + p - 1) on p stages with m micro-batches per step;
        interleaved 1F1B, V stages on each of p devices: (p - 1) / (V*m + p - 1)."""
        if self.parallel != "pipeline":
            return None
        p, m, v = len(self.devices), self.spec.micro_batches, self.spec.pipeline_stages_per_rank
        return (p - 1) / (v * m + p - 1)

    @property
    def fits(self) -> bool:
        return not self.unplaced and all(d.fits for d in self.devices)

    def as_dict(self) -> dict:
        cfg = self.spec.model_config
        return {
            "model": self.spec.name,
            "model_type": getattr(cfg, "model_type", None),
            "seq_len": self.spec.seq_len,
            "micro_batch": self.spec.micro_batch,
            "gradient_checkpointing": self.spec.gradient_checkpointing,
            "compute_dtype": str(as_dtype(self.spec.compute_dtype)).replace("torch.", ""),
            "quantization": self.spec.quantization,
            "lora_r": self.spec.lora_r,
            "optimizer": self.spec.optimizer,
            "embeddings": self.spec.embeddings,
            "fused_cross_entropy": self.fused_loss,
            "parallel": self.parallel,
            "nodes": self.nodes,
            "fits": self.fits,
            "min_devices": self.min_devices,
            "totals": self.totals,
            "activations_with_checkpointing": self.activations_with_checkpointing,
            "activations_without_checkpointing": self.activations_without_checkpointing,
            "devices": [d.as_dict() for d in self.devices],
            "unplaced": self.unplaced,
            "device_map": {k: str(v) for k, v in self.device_map.items()},
            "overhead_figures": overhead_figures(),
            "notes": self.notes,
            **({"pipeline": {
                "schedule": self.spec.pipeline_schedule,
                "micro_batches": self.spec.micro_batches,
                "stages": [[r.start, r.stop] for r in self.stages],
                "stages_per_rank": self.spec.pipeline_stages_per_rank,
                "idle_fraction": self.idle_fraction,
            }} if self.parallel == "pipeline" else {}),
            **({"throughput": self.throughput.as_dict()} if self.throughput is not None else {}),
        }

    def table(self) -> str:
        return format_plan(self)

    def advice(self) -> str:
        """What would fit instead, for the error a trainer raises before loading weights."""
        return plan_advice(self)


def as_gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(plan: MemoryPlan) -> str:
    spec = plan.spec
    lines = [
        f"Memory plan: {spec.name} ({plan.totals['parameters'] / 1e9:.2f}B params), "
        f"micro_batch={spec.micro_batch}, seq_len={spec.seq_len}, "
        f"gradient_checkpointing={spec.gradient_checkpointing}, {spec.quantization} base, "
        f"LoRA r={spec.lora_r} ({plan.totals['lora_numel'] / 1e6:.1f}M params, {as_dtype(spec.lora_dtype)}), "
        f"{spec.optimizer}, embeddings/head {'int8' if spec.embeddings == 'int8' else str(as_dtype(spec.compute_dtype)).replace('torch.', '')}, "
        f"loss {'fused linear+CE (token chunks)' if plan.fused_loss else 'from full logits'}"
        + (f", FSDP2 over {len(plan.devices)} devices ({plan.nodes} node(s))" if plan.parallel == "fsdp" else "")
        + (f", pipeline over {len(plan.devices)} stages ({spec.pipeline_schedule}, {spec.micro_batches} "
           f"micro-batches per step)" if plan.parallel == "pipeline" else ""),
        "",
        "Whole model (GiB):",
    ]
    t = plan.totals
    for label, key in [
        ("quantized weights + scales", "quantized_weights"),
        ("unquantized weights", "other_weights"),
        ("LoRA parameters", "lora_params"),
        ("LoRA gradients", "lora_grads"),
        (f"optimizer states ({spec.optimizer})", "optimizer_states"),
    ]:
        lines.append(f"  {label:<42} {as_gib(t[key]):>9}")
    lines.append(f"  {'activations kept, gradient checkpointing':<42} {as_gib(plan.activations_with_checkpointing):>9}")
    lines.append(f"  {'activations kept, no checkpointing':<42} {as_gib(plan.activations_without_checkpointing):>9}")
    lines.append(f"  {'largest temporary (loss or block backward)':<42} {as_gib(max(d.temporary for d in plan.devices)):>9}")
    fsdp = plan.parallel == "fsdp"
    pipe = plan.parallel == "pipeline"
    lines += ["", "Per pipeline stage (GiB):" if pipe else "Per device (GiB):"]
    header = (
        f"  {'device':<8} {'blocks':>6} "
        + (f"{'range':>7} {'in fl':>5} " if pipe else "")
        + f"{'quant w':>8} {'other w':>8} {'LoRA':>6} {'grads':>6} {'optim':>6} "
        + (f"{'gather':>7} " if fsdp else "")
        + (f"{'bufs':>6} " if pipe else "")
        + f"{'activ':>7} {'temp':>6} {'alloc':>7} {'ovhd':>6} {'total':>7} {'cap':>7} {'headroom':>8}  verdict"
    )
    lines.append(header)
    for index, d in enumerate(plan.devices):
        row = d.as_dict()
        span = ""
        if pipe:  # interleaved: the device's stages index, index+p, ...
            runs = plan.stages[index::len(plan.devices)]
            span = f"{','.join(f'{run.start}-{run.stop - 1}' for run in runs):>7} {d.in_flight:>5} "
        lines.append(
            f"  {d.device.name:<8} {row['blocks']:>6} " + span
            + f"{as_gib(d.quantized_weights):>8} {as_gib(d.other_weights):>8} "
            f"{as_gib(d.lora_params):>6} {as_gib(d.lora_grads):>6} {as_gib(d.optimizer_states):>6} "
            + (f"{as_gib(d.gathered):>7} " if fsdp else "")
            + (f"{as_gib(d.buffers):>6} " if pipe else "")
            + f"{as_gib(d.activations):>7} {as_gib(d.temporary):>6} {as_gib(d.allocated):>7} {as_gib(d.overhead):>6} "
            f"{as_gib(d.total):>7} {as_gib(d.device.capacity):>7} {as_gib(d.headroom):>8}  "
            f"{'fits' if d.fits else 'DOES NOT FIT'}"
        )
    if plan.unplaced:
        lines.append(f"  not placed on any device: {len(plan.unplaced)} units ({', '.join(plan.unplaced[:4])} ...)")
    lines.append("")
    lines.append(f"Verdict: {'fits' if plan.fits else 'does NOT fit'} on {len(plan.devices)} device(s)"
                 + (f", smallest headroom {as_gib(min(d.headroom for d in plan.devices))} GiB." if pipe else "."))
    if pipe and spec.pipeline_stages_per_rank > 1:
        p, m, v = len(plan.devices), spec.micro_batches, spec.pipeline_stages_per_rank
        lines.append(f"Pipeline idle fraction (p-1)/(V*m+p-1) = {p - 1}/{v * m + p - 1} = {plan.idle_fraction:.1%} "
                     f"({p} devices x {v} stages, {m} micro-batches of {spec.micro_batch} x {spec.seq_len} tokens "
                     "per step; Narayanan et al. 2021)")
    elif pipe:
        p, m = len(plan.stages), spec.micro_batches
        lines.append(f"Pipeline idle fraction (p-1)/(m+p-1) = {p - 1}/{m + p - 1} = {plan.idle_fraction:.1%} "
                     f"({p} stages, {m} micro-batches of {spec.micro_batch} x {spec.seq_len} tokens per step)")
    if plan.min_devices is not None:
        size = plan.devices[0].device.capacity
        lines.append(f"Minimum number of {size / GiB:g} GiB devices: {plan.min_devices}")
    lines.append(overhead_figures())
    lines += plan.notes
    if plan.throughput is not None:
        lines += ["", plan.throughput.table()]
    return "\n".join(lines)


def plan_advice(plan: MemoryPlan) -> str:
    if plan.fits:
        return "the plan fits"
    tips = []
    if plan.min_devices is not None:
        size = plan.devices[0].device.capacity / GiB
        tips.append(f"{plan.min_devices} devices of {size:g} GiB")
    if not plan.spec.gradient_checkpointing:
        tips.append("gradient checkpointing (training.gradient_checkpointing=true)")
    if plan.spec.seq_len > 128 or plan.spec.micro_batch > 1:
        tips.append("a shorter sequence or micro-batch (training.seq_len=..., training.micro_batch=...)")
    if plan.parallel == "pipeline":
        if plan.spec.micro_batches > len(plan.devices):
            tips.append("fewer micro-batches per step (parallel.pipeline.micro_batches=...; each adds receive "
                        "buffers on every stage)")
        if not plan.spec.pipeline_cpu_embeddings:
            tips.append("the embedding table in host memory (parallel.pipeline.cpu_embeddings=true)")
    over = [f"{d.device.name} needs {as_gib(d.total)} GiB of {as_gib(d.device.capacity)}" for d in plan.devices if not d.fits]
    if plan.unplaced:
        static = sum(plan.totals[k] for k in ("quantized_weights", "other_weights", "lora_params", "lora_grads",
                                              "optimizer_states"))
        capacity = sum(d.device.capacity for d in plan.devices)
        over.append(
            f"{len(plan.unplaced)} modules found no device (weights, LoRA and optimizer states alone take "
            f"{as_gib(static)} GiB; the {len(plan.devices)} device(s) have {as_gib(capacity)} GiB)"
        )
    return "does not fit: " + "; ".join(over) + (". Would fit with: " + ", or ".join(tips) if tips else "")
