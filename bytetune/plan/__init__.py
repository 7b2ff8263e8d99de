"""bytetune.plan: how much memory a fine-tune needs per device, before loading any weight.

One way down, no module importing one above it:
spec (PlanSpec, from a recipe) and devices (Device, runtime overhead) -> meta_model (the model on
the meta device) -> counting (weights, LoRA, optimizer states) and activations (what autograd
keeps, the loss and backward phases) -> report (MemoryPlan, its table and advice) -> placement
(Planner: device map, per-device totals, minimum device count) -> runtime (what the trainer asks).
Pipelines: pipeline (per-stage memory, the balanced split; ``pipeline_stages`` for the runtime)
and throughput (FLOPs per token, GPU peaks, link bandwidths) sit beside report, below placement.
"""

from bytetune.plan.devices import Device, parse_devices
from bytetune.plan.placement import Planner, pipeline_stages, plan_memory
from bytetune.plan.report import MemoryPlan
from bytetune.plan.spec import PlanSpec, spec_from_recipe

__all__ = ["Device", "MemoryPlan", "Planner", "PlanSpec", "parse_devices", "pipeline_stages", "plan_memory",
           "spec_from_recipe"]
