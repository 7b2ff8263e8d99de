"""The kernels, the optimizers and the layers import without the packages the GPU machine's image
lacks (omegaconf, datasets, gguf, bitsandbytes, torchao): bench/gpu_check.sh must reach its kernel
tests there even before the carried wheels are installed. Each case runs in a fresh interpreter
whose import system refuses those packages, as if they were not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_IMAGE = ("omegaconf", "datasets", "gguf", "bitsandbytes", "torchao")

# None in sys.modules is how Python spells "not installed" for the packages we block: `import X`
# raises ModuleNotFoundError and importlib.util.find_spec("X") returns None, so the optional-import
# probes of transformers and peft see the package as absent, as on the image.
BLOCKER = """
import sys
BLOCKED = set({blocked!r})
for name in BLOCKED:
    sys.modules[name] = None
"""


def run_blocked(code: str, blocked=ABSENT_ON_THE_IMAGE) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=tuple(blocked)) + code
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks():
    # The test can fail: with the blocker in place, importing a blocked package that IS installed
    # here (omegaconf is a dependency of bytetune) raises ImportError.
    done = run_blocked("import omegaconf")
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr and "omegaconf" in done.stderr


def test_floors_below_the_recipe_import_without_the_absent_packages():
    # One interpreter for all the checks: each import of transformers costs seconds.
    code = """
import bytetune
assert 'bytetune.plan' not in sys.modules, 'the planner (omegaconf) loaded with the package'
for module in ('bytetune.kernels', 'bytetune.optim', 'bytetune.quant_layers'):
    __import__(module)
from bytetune import AdamW8bit, Int8Linear, StableEmbedding, quantize_model
loaded = sorted(m for m in sys.modules if m.partition('.')[0] in BLOCKED and sys.modules[m] is not None)
assert not loaded, loaded
try:
    bytetune.plan_memory
except ModuleNotFoundError as error:
    assert error.name == 'omegaconf', error
else:
    raise AssertionError('the planner loaded without omegaconf')
print('ok')
"""
    done = run_blocked(code)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_the_planner_loads_on_first_use():
    import bytetune
    from bytetune.plan import plan_memory

    assert bytetune.plan_memory is plan_memory
    assert "plan_memory" in bytetune.__all__
    with pytest.raises(AttributeError):
        bytetune.no_such_name
