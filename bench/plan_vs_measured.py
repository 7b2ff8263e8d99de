"""Memory planner vs measured peak of real training steps (each in a fresh process).

On CPU: two small BLOOM shapes in fp32 (process resident-set peak above the pre-load size). On a
GPU: the ~350M and ~1B BLOOM shapes in bf16 (torch.cuda.max_memory_allocated), the int8 base,
LoRA r=16 on every block linear, AdamW8bit. Prints predicted, measured and their ratio.

    python bench/plan_vs_measured.py [--out bench/results/FILE.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import BloomConfig  # noqa: E402

from bytetune.plan import PlanSpec, Planner  # noqa: E402
from plan_measure import measure_in_subprocess  # noqa: E402  (bench/, beside this script)

CPU_CASES = [  # name, shape, gradient checkpointing, micro-batch, seq_len
    ("bloom-6m", dict(hidden_size=256, n_layer=4, n_head=8, vocab_size=4096), False, 4, 256),
    ("bloom-6m", dict(hidden_size=256, n_layer=4, n_head=8, vocab_size=4096), True, 4, 256),
    ("bloom-20m", dict(hidden_size=512, n_layer=6, n_head=8, vocab_size=8192), False, 2, 256),
    ("bloom-20m", dict(hidden_size=512, n_layer=6, n_head=8, vocab_size=8192), True, 2, 256),
]
GPU_CASES = [
    ("bloom-350m", dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=50304), True, 8, 512),
    ("bloom-1b", dict(hidden_size=2048, n_layer=20, n_head=16, vocab_size=50304), True, 4, 512),
    ("bloom-350m", dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=50304), False, 4, 512),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype, cases = ("cuda", "bfloat16", GPU_CASES) if cuda else ("cpu", "float32", CPU_CASES)
    where = torch.cuda.get_device_name() if cuda else "CPU (peak RSS above the pre-load size)"
    lines = [f"# Planner vs measured peak memory, {where}, {dtype}, int8 base, LoRA r=16, AdamW8bit", "",
             "| model | checkpointing | batch x seq | predicted MiB | measured MiB | measured / predicted |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, shape, ckpt, batch, seq in cases:
        spec = PlanSpec(BloomConfig(**shape), seq_len=seq, micro_batch=batch, gradient_checkpointing=ckpt,
                        compute_dtype=dtype, quantization="int8", lora_r=16, lora_alpha=32, lora_dropout=0.05,
                        optimizer="adamw8bit", name=name)
        predicted = Planner(spec).plan("1x80GiB" if cuda else "cpu:24GiB").devices[0].allocated
        job = dict(config={"model_type": "bloom", **shape}, seq_len=seq, micro_batch=batch, gradient_checkpointing=ckpt,
                   dtype=dtype, int8=True, lora_r=16, lora_dropout=0.05, optimizer="adamw8bit", steps=2, device=device)
        measured = measure_in_subprocess(job)["peak_bytes"]
        line = (f"| {name} | {ckpt} | {batch} x {seq} | {predicted / 2**20:.1f} | {measured / 2**20:.1f} | "
                f"{measured / predicted:.3f} |")
        lines.append(line)
        print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
