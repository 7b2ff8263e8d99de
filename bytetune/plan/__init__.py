"""bytetune.plan: how much memory a fine-tune needs per device, before loading any weight."""

from bytetune.plan.memory import (
    Device,
    MemoryPlan,
    Planner,
    PlanSpec,
    parse_devices,
    plan_memory,
    spec_from_recipe,
)

__all__ = ["Device", "MemoryPlan", "Planner", "PlanSpec", "parse_devices", "plan_memory", "spec_from_recipe"]
