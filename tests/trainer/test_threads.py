"""The intra-op thread rule: recipe, then OMP_NUM_THREADS, then a resumed checkpoint's count,
then the idle cores among those this process may use (never more than torch's current count)."""

from __future__ import annotations

import pytest
import torch

from bytetune.recipe import RecipeError
from bytetune.trainer import threads


@pytest.fixture
def two_free_cores(monkeypatch):
    """A machine of two usable cores, no cgroup quota, torch at 2 threads, no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield monkeypatch
    torch.set_num_threads(before)


@pytest.mark.parametrize("idle, expected", [(0.0, 1), (0.4, 1), (0.6, 1), (1.6, 2), (2.0, 2)])
def test_idle_cores_decide_when_nothing_else_does(two_free_cores, idle, expected):
    two_free_cores.setattr(threads, "idle_cpus", lambda cpus, seconds=0.1: idle)
    assert threads.choose_threads()[0] == expected


def test_order_of_the_rules(two_free_cores):
    two_free_cores.setattr(threads, "idle_cpus", lambda cpus, seconds=0.1: 0.0)  # a loaded machine
    assert threads.choose_threads(requested=2) == (2, "training.threads")
    assert threads.choose_threads(recorded=2) == (2, "the resumed checkpoint's count")
    two_free_cores.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads(recorded=1) == (2, "OMP_NUM_THREADS")  # torch read it: 2 now
    two_free_cores.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    two_free_cores.delenv("OMP_NUM_THREADS")
    assert threads.choose_threads()[0] == 1


def test_never_above_what_the_caller_set(two_free_cores):
    two_free_cores.setattr(threads, "idle_cpus", lambda cpus, seconds=0.1: 2.0)
    torch.set_num_threads(1)  # e.g. a test suite's choice: auto never raises it
    assert threads.apply_threads() == {"threads": 1, "rule": "one usable core"}
    assert torch.get_num_threads() == 1


def test_apply_sets_the_count(two_free_cores):
    assert threads.apply_threads(requested=1)["threads"] == 1 and torch.get_num_threads() == 1


def test_bad_thread_count_is_one_line():
    with pytest.raises(RecipeError, match="training.threads must be >= 1"):
        threads.choose_threads(requested=0)


def test_idle_sampling_reads_this_machine():
    idle = threads.idle_cpus(threads.usable_cpus(), 0.05)
    assert idle is None or 0.0 <= idle <= len(threads.usable_cpus()) + 1e-9
