"""The package as a user installs it: build the wheel, install it (not editable) into a scratch
venv, and from a directory outside the repository run the console scripts on shipped recipes,
which must come from the wheel's package data."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from (a copy, so the build leaves nothing in the working tree).
SOURCES = ("pyproject.toml", "README.md", "bytetune")


def _run(args: list, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _start(args: list, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _scratch_site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", wheels, source], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("bytetune-*.whl")

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
                     cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    if sys.prefix != sys.base_prefix:
        # The test runs in a venv: "system site packages" of the scratch venv are the base
        # interpreter's, so the dependencies (torch, transformers, ...) are made visible by a path
        # file, added after the install so that pip never sees this venv's (editable) bytetune.
        # Plain paths in a .pth are appended after the scratch venv's own site-packages and their
        # own .pth files (the editable finder) are not run: the wheel's bytetune wins.
        paths = "\n".join(site.getsitepackages())
        (_scratch_site_packages(venv) / "zz_test_dependencies.pth").write_text(paths + "\n")

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    found = _run([python, "-c", "import importlib.util; print(importlib.util.find_spec('bytetune').origin)"],
                 cwd=outside, env=env)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).is_relative_to(venv), found.stdout

    # Both at once: most of each one's time is importing torch and transformers.
    planning = _start([venv / "bin" / "bytetune-plan", "recipe=bloom_lora8", "gpus=8x24GiB"], cwd=outside, env=env)
    run_dir = tmp_path / "run"
    training = _start([
        venv / "bin" / "bytetune-train", "recipe=tiny_lora8", "training.max_steps=2", f"output_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}", "checkpoint.every_steps=0", "eval.max_batches=1",
        "logging.progress_bar=false", "logging.plot=false", "logging.tensorboard=false",
    ], cwd=outside, env=env)
    plan, train = _finish(planning), _finish(training)

    # 0: it fits, 1: it does not; either way it planned and printed the table
    assert plan.returncode in (0, 1), plan.stderr
    assert "Memory plan: bloom_lora8" in plan.stdout and "Device map:" in plan.stdout, plan.stdout
    assert train.returncode == 0, train.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    # the recipe's model name, not a path into the scratch venv
    assert adapter["base_model_name_or_path"] == "tiny-bloom"
