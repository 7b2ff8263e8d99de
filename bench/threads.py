"""Step time of the tiny recipe at 1 and 2 intra-op threads, in one process, interleaved, and
what bytetune's thread rule (bytetune/trainer/threads.py) picks on this machine right now.

Each round times ``--steps`` optimizer steps at every thread count in turn, so load from other
processes hits all counts alike; prints the median ms/step and the min-max over the rounds, the
machine's idle cores sampled before the rounds, and the 1-minute load average. Under a minute.

Usage: python bench/threads.py [--threads 1,2] [--steps 4] [--rounds 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="append the table to this markdown file")
    args = parser.parse_args()
    counts = [int(t) for t in args.threads.split(",")]

    import torch

    from bytetune.trainer.threads import choose_threads, idle_cpus, usable_cpus
    from bytetune.trainer.trainer import Trainer

    env_threads = os.environ.pop("OMP_NUM_THREADS", None)  # the rule's own choice, for the record
    default_threads = torch.get_num_threads()
    picked, rule = choose_threads()
    idle = idle_cpus(usable_cpus(), 0.5)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer.from_recipe("tiny_lora8", **{
            "output_dir": f"{tmp}/run", "data.cache_dir": f"{tmp}/cache", "data.eval": None,
            "logging.progress_bar": False, "training.max_steps": 1000, "training.threads": counts[0]})
        trainer._train_step()  # warm-up: first-call costs out of the timings
        times = {count: [] for count in counts}
        for _ in range(args.rounds):
            for count in counts:
                torch.set_num_threads(count)
                started = time.perf_counter()
                for _ in range(args.steps):
                    trainer._train_step()
                times[count].append((time.perf_counter() - started) / args.steps * 1e3)
    if env_threads is not None:
        os.environ["OMP_NUM_THREADS"] = env_threads
    host = f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
           f"{len(usable_cpus())} usable)"
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {host}",
        "",
        f"tiny_lora8 (2-layer BLOOM, 4 x 32 tokens x 2 micro-batches per step), {args.rounds} rounds x "
        f"{args.steps} steps per thread count, interleaved. torch default threads: {default_threads}; "
        f"1-min load average {load:.1f}; idle cores {idle if idle is None else f'{idle:.2f}'} of {len(usable_cpus())}; "
        f"bytetune's rule picked **{picked}** ({rule}).",
        "",
        "| threads | median ms/step | min-max ms/step |",
        "|---|---|---|",
    ]
    for count in counts:
        lines.append(f"| {count} | {statistics.median(times[count]):.0f} | {min(times[count]):.0f}-{max(times[count]):.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
