"""How many intra-op threads a run uses, chosen when it starts instead of left to chance.

torch's default is one thread per physical core, whatever else the machine is doing. On a shared
CPU that oversubscribes it: OpenMP threads wait on each other behind other processes' work (one
process on 2 loaded cores ran 6-15x slower per step with 2 threads than with 1). The rule:

1. ``training.threads`` when the recipe sets it;
2. else ``OMP_NUM_THREADS`` when the environment sets it (torch has read it already);
3. else, when resuming, the count the checkpoint recorded: float reductions split over another
   number of threads round differently, and a resumed run should end bitwise where an
   uninterrupted one would;
4. else the idle CPUs among those this process may use (``os.sched_getaffinity``, sampled from
   ``/proc/stat`` over 0.1 s, capped by a cgroup CPU quota), at least 1 and at most torch's
   current count (which a caller's ``torch.set_num_threads`` sets).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from bytetune.recipe.schema import RecipeError

SAMPLE_SECONDS = 0.1


def usable_cpus() -> list[int]:
    """The CPU ids this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup v2 quota (``cpu.max``: quota period), None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (idle ticks, total ticks)} from /proc/stat."""
    times = {}
    wanted = set(cpus)
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in wanted:
            values = [int(v) for v in fields[:8]]
            times[int(name[3:])] = (values[3] + values[4], sum(values))  # idle + iowait
    return times


def idle_cpus(cpus: list[int], seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of ``cpus`` were idle over ``seconds`` (fractional); None without /proc/stat."""
    try:
        before = _cpu_times(cpus)
        time.sleep(seconds)
        after = _cpu_times(cpus)
    except (OSError, ValueError):
        return None
    idle = 0.0
    for cpu, (idle_after, total_after) in after.items():
        idle_before, total_before = before.get(cpu, (idle_after, total_after))
        elapsed = total_after - total_before
        if elapsed > 0:
            idle += (idle_after - idle_before) / elapsed
    return idle if after else None


def choose_threads(requested: int | None = None, recorded: int | None = None) -> tuple[int, str]:
    """(thread count, the rule that chose it); see the module docstring."""
    if requested is not None:
        if requested < 1:
            raise RecipeError(f"training.threads must be >= 1 (or null: chosen from the machine), got {requested}")
        return requested, "training.threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    if recorded:
        return int(recorded), "the resumed checkpoint's count"
    cpus = usable_cpus()
    cap = min(torch.get_num_threads(), len(cpus))
    limit = cgroup_cpu_limit()
    if limit is not None:
        cap = min(cap, max(1, math.floor(limit)))
    if cap <= 1:
        return 1, "one usable core"
    idle = idle_cpus(cpus)
    if idle is None:
        return cap, "usable cores"
    return max(1, min(cap, math.floor(idle + 0.5))), f"idle cores ({idle:.1f} of {len(cpus)})"


def apply_threads(requested: int | None = None, recorded: int | None = None) -> dict:
    """Choose the count, set it for this process, and say so ({"threads", "rule"})."""
    threads, rule = choose_threads(requested, recorded)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return {"threads": threads, "rule": rule}
