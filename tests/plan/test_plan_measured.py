"""Planner vs measured peak memory of real training steps on CPU, each in a fresh process."""

import sys
from pathlib import Path

import pytest
from transformers import BloomConfig

from bytetune.plan import PlanSpec, Planner

# The measuring harness is a benchmark script (bench/plan_measure.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from plan_measure import measure_in_subprocess  # noqa: E402

# Two BLOOM shapes (~6M and ~20M parameters); one runs plain, one with gradient checkpointing.
CASES = [
    ("bloom-6m", dict(hidden_size=256, n_layer=4, n_head=8, vocab_size=4096), False),
    ("bloom-20m", dict(hidden_size=512, n_layer=6, n_head=8, vocab_size=8192), True),
]
SEQ_LEN, MICRO_BATCH, LORA_R, DROPOUT = 128, 4, 8, 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name,shape,checkpointing", CASES, ids=[c[0] for c in CASES])
def test_planner_within_15_percent_of_measured_cpu_peak(name, shape, checkpointing):
    spec = PlanSpec(BloomConfig(**shape), seq_len=SEQ_LEN, micro_batch=MICRO_BATCH,
                    gradient_checkpointing=checkpointing, compute_dtype="float32", quantization="int8",
                    lora_r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=DROPOUT, optimizer="adamw8bit", name=name)
    predicted = Planner(spec).plan("cpu:24GiB").devices[0]
    job = dict(config={"model_type": "bloom", **shape}, seq_len=SEQ_LEN, micro_batch=MICRO_BATCH,
               gradient_checkpointing=checkpointing, dtype="float32", int8=True, lora_r=LORA_R,
               lora_dropout=DROPOUT, optimizer="adamw8bit", steps=2)
    measured = measure_in_subprocess(job)["peak_bytes"]
    # The planner's tensors (the process runtime is outside the measured delta).
    ratio = measured / predicted.allocated
    print(f"{name} checkpointing={checkpointing}: predicted {predicted.allocated / 2**20:.1f} MiB, "
          f"measured {measured / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15
