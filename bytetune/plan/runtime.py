"""What the trainer asks of the planner: the devices of this machine, a plan that must fit before
any weight loads, and the measured peaks to record beside the prediction."""

from __future__ import annotations

import os
import resource
import warnings

import torch

from bytetune.plan.devices import Device
from bytetune.plan.placement import plan_memory
from bytetune.plan.report import MemoryPlan
from bytetune.plan.spec import spec_from_recipe
from bytetune.recipe import RecipeError


class DoesNotFitError(RecipeError):
    """The recipe's plan does not fit this machine's devices; the message says what would."""


def local_devices(recipe) -> list[Device]:
    """The devices a run of ``recipe`` trains on here.

    With ``model.device_map: auto`` the model is split over every visible GPU; a pipeline
    (``parallel.strategy: pipeline``) over one GPU of this size per process (``WORLD_SIZE``, as
    torchrun sets it); otherwise each process holds the whole model on one GPU; without CUDA, the
    CPU with all physical memory.
    """
    if torch.cuda.is_available():
        count = torch.cuda.device_count() if recipe.model.device_map == "auto" else 1
        parallel = recipe.get("parallel")
        if parallel is not None and parallel.get("strategy") == "pipeline":
            count = int(os.environ.get("WORLD_SIZE", "1"))
            size = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
            return [Device(f"cuda:{i}", size) for i in range(count)]
        return [Device(f"cuda:{i}", torch.cuda.get_device_properties(i).total_memory) for i in range(count)]
    return [Device("cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))]


def plan_for_run(recipe, model_config=None, find_min: bool = False) -> MemoryPlan | None:
    """The recipe's memory plan on this machine, or None (with a warning) when the planner cannot
    model the architecture; it never loads weights."""
    try:
        spec = spec_from_recipe(recipe, model_config=model_config)
        return plan_memory(spec, local_devices(recipe), find_min=find_min)
    except (ValueError, KeyError, AttributeError, NotImplementedError) as error:
        warnings.warn(f"memory planner skipped: {error}")
        return None


def check_fits(recipe) -> MemoryPlan | None:
    """The plan, or :class:`DoesNotFitError` naming what would fit (more GPUs, shorter sequences,
    gradient checkpointing) when the recipe cannot run on this machine."""
    plan = plan_for_run(recipe)
    if plan is None or plan.fits:
        return plan
    # Only a failing plan pays for the search of the smallest device count.
    plan = plan_for_run(recipe, find_min=True)
    raise DoesNotFitError(f"recipe {recipe.name!r} {plan.advice()}")


def measured_peaks() -> list[dict]:
    """Peak memory per device of this process: torch.cuda.max_memory_allocated per GPU, or the
    process's peak resident set on CPU."""
    if torch.cuda.is_available():
        return [
            {"device": f"cuda:{i}", "measured_peak_bytes": torch.cuda.max_memory_allocated(i),
             "measured_kind": "cuda_max_memory_allocated"}
            for i in range(torch.cuda.device_count())
        ]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return [{"device": "cpu", "measured_peak_bytes": peak, "measured_kind": "process_peak_rss"}]


def memory_report(plan: MemoryPlan | None) -> list[dict]:
    """Per device: the measured peak beside the planner's prediction.

    On a GPU the measurement is what torch allocated, so it stands beside ``predicted_allocated``;
    on CPU it is the whole process, so beside ``predicted_total`` (tensors + runtime + slack).
    """
    predicted = {d.device.name: d for d in plan.devices} if plan is not None else {}
    rows = []
    for row in measured_peaks():
        device = predicted.get(row["device"])
        if device is not None:
            row["predicted_allocated_bytes"] = device.allocated
            row["predicted_total_bytes"] = device.total
            compare = device.allocated if device.device.kind == "cuda" else device.total
            row["measured_over_predicted"] = row["measured_peak_bytes"] / compare if compare else None
        rows.append(row)
    return rows
