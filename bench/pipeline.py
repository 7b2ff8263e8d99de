"""Pipeline-parallel step on CPU: 2 stages (2 processes over gloo) against one process, same model.

A BLOOM-architecture model (random weights, saved once as a float safetensors checkpoint) trains
with the tiny_lora8 recipe's settings (int8 base, LoRA on every block linear, AdamW8bit) on the
same rows: the pipeline runs M micro-batches per step through 2 stages (parallel.strategy:
pipeline, one thread per process), one process runs the same M micro-batches as accumulation
steps, with 1 thread and with 2 threads (the pipeline's 2 processes use 2 cores in all). Each
side runs in fresh processes; tokens/s is over the steps after the first (the pipeline's first
step also infers the stages' shapes).

    python bench/pipeline.py                       # hidden 256, 8 blocks, seq 128, 8 micro-batches of 2
    python bench/pipeline.py --hidden 512 --blocks 8 --steps 4

A third side runs the same pipeline under interleaved_1f1b: the 2 processes each run 2 stages
(rank r stages r and r+2), idle (p-1)/(V*m+p-1), for twice the activation messages.

The idle fraction of a p-stage GPipe/1F1B step with m micro-batches is (p-1)/(m+p-1); the CPU
ratio here also carries the cost of sending activations between processes and of one thread per
stage against a two-thread process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def recipe_overrides(args, model_dir: Path, out: Path) -> dict:
    return {
        "model.from_config": False, "model.name_or_path": str(model_dir), "output_dir": str(out),
        "data.cache_dir": str(out.parent / "data_cache"), "data.max_train_chars": 400_000, "data.max_eval_chars": 4000,
        "training.seq_len": args.seq_len, "training.micro_batch_size": args.micro_batch,
        "training.grad_accum_steps": args.micro_batches, "training.max_steps": args.steps,
        "lora.dropout": 0.0, "eval.at_start": False, "checkpoint.every_steps": 0, "logging.progress_bar": False,
        "logging.plot": False, "schedule.warmup_steps": 0,
    }


def timed_steps(trainer, steps: int) -> dict:
    """Seconds of each optimizer step (the trainer's own step; no checkpoint, no eval)."""
    trainer.model.train()
    times, tokens = [], 0
    for _ in range(steps):
        start = time.perf_counter()
        _, step_tokens = trainer._train_step()
        times.append(time.perf_counter() - start)
        trainer.step += 1
        tokens = step_tokens
    timed = times[1:]
    return {"step_s": times, "tokens_per_step": tokens, "tokens_per_s": tokens * len(timed) / sum(timed)}


def worker(kind: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    overrides = json.loads(args.overrides)
    if kind == "pipeline":
        import torch.distributed as dist

        from bytetune.trainer.pipeline import PipelineTrainer

        trainer = PipelineTrainer.from_recipe("tiny_lora8", **{"parallel.strategy": "pipeline", **overrides})
        result = timed_steps(trainer, args.steps)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)
        dist.barrier()
    else:
        from bytetune.trainer.trainer import Trainer

        trainer = Trainer.from_recipe("tiny_lora8", **overrides)
        print("RESULT " + json.dumps(timed_steps(trainer, args.steps)), flush=True)


def run(command: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def modelled_gpu_speeds(args, model_dir: Path, out: Path) -> dict:
    """The planner's modelled step of this model on 2 GPUs of kind ``args.gpu`` (bytetune.plan.
    throughput): tokens/s of device_map, pipeline (1F1B, and interleaved 1F1B with 2 stages per
    GPU) and FSDP2, and the memory verdicts."""
    from transformers import AutoConfig

    from bytetune.plan import plan_memory, spec_from_recipe
    from bytetune.recipe import load_recipe

    speeds, fits = {}, {}
    for schedule in ("1f1b", "interleaved_1f1b"):
        recipe = load_recipe("tiny_lora8", {**recipe_overrides(args, model_dir, out), "parallel.strategy": "pipeline",
                                            "parallel.pipeline.schedule": schedule})
        spec = spec_from_recipe(recipe, model_config=AutoConfig.from_pretrained(model_dir))
        plan = plan_memory(spec, f"2x{args.gpu_memory}", find_min=False, parallel="pipeline", throughput=True,
                           gpu=args.gpu)
        model = plan.throughput
        for strategy in model.strategies:
            name = strategy.strategy
            if schedule != "1f1b":
                if name != "pipeline":
                    continue
                name = "pipeline (interleaved_1f1b)"
            speeds[name], fits[name] = strategy.tokens_per_s, strategy.fits
    return {"gpu": model.gpu.name, "link": model.link, "tokens_per_s": speeds, "fits": fits}


def make_model(args, directory: Path) -> int:
    from bytetune.recipe import load_recipe
    from bytetune.loaders.models import load_base_model

    shrink = {"model.shrink.num_layers": args.blocks, "model.shrink.hidden_size": args.hidden,
              "model.shrink.num_heads": args.heads, "model.shrink.vocab_size": 512}
    base, tokenizer = load_base_model(load_recipe("tiny_lora8", shrink))
    base.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in base.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per side; the first is not timed")
    parser.add_argument("--gpu", default="rtx4090", help="GPU kind of the planner's modelled speed-up (bytetune.plan.throughput)")
    parser.add_argument("--gpu-memory", default="24GiB", help="memory of each of the 2 modelled GPUs")
    parser.add_argument("--worker", choices=["pipeline", "single"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args)

    with tempfile.TemporaryDirectory(prefix="bytetune_pipeline_bench_") as tmp:
        tmp = Path(tmp)
        params = make_model(args, tmp / "model")
        me = [sys.executable, str(Path(__file__).resolve())]
        common = ["--steps", str(args.steps)]
        rows = []
        pipeline_overrides = json.dumps(recipe_overrides(args, tmp / "model", tmp / "pipeline"))
        pipeline = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29591",
                        me[1], "--worker", "pipeline", "--threads", "1", "--overrides", pipeline_overrides, *common], 1)
        rows.append(("pipeline, 2 stages (2 processes x 1 thread, 1F1B)", pipeline))
        interleaved_overrides = json.dumps({**recipe_overrides(args, tmp / "model", tmp / "interleaved"),
                                            "parallel.pipeline.schedule": "interleaved_1f1b"})
        interleaved = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29591", me[1], "--worker", "pipeline", "--threads", "1", "--overrides",
                           interleaved_overrides, *common], 1)
        for threads in (1, 2):
            overrides = json.dumps(recipe_overrides(args, tmp / "model", tmp / f"single{threads}"))
            single = run([*me, "--worker", "single", "--threads", str(threads), "--overrides", overrides, *common], threads)
            rows.append((f"one process, {threads} thread{'s' if threads > 1 else ''}", single))
        rows.insert(1, ("pipeline, 2 x 2 stages (2 processes x 1 thread, interleaved 1F1B)", interleaved))
        modelled = modelled_gpu_speeds(args, tmp / "model", tmp / "plan")

    p, m = 2, args.micro_batches
    print(f"# bench/pipeline.py on {platform.node()} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}), "
          f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"# BLOOM architecture, hidden {args.hidden}, {args.blocks} blocks, {params / 1e6:.1f}M parameters; int8 base, "
          f"LoRA r=4, AdamW8bit; seq {args.seq_len}, {m} micro-batches of {args.micro_batch} per step "
          f"({pipeline['tokens_per_step']} tokens); {args.steps - 1} timed steps after 1 untimed")
    print(f"# GPipe/1F1B idle fraction for p={p}, m={m}: (p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.1%}; "
          f"interleaved 1F1B, V=2: (p-1)/(V*m+p-1) = {(p - 1) / (2 * m + p - 1):.1%}")
    print()
    print("| side | s/step (timed) | tokens/s | vs one process, 1 thread | vs one process, 2 threads |")
    print("|---|---|---|---|---|")
    base1, base2 = rows[2][1]["tokens_per_s"], rows[3][1]["tokens_per_s"]
    for name, result in rows:
        timed = result["step_s"][1:]
        print(f"| {name} | {sum(timed) / len(timed):.2f} | {result['tokens_per_s']:.0f} | "
              f"{result['tokens_per_s'] / base1:.2f}x | {result['tokens_per_s'] / base2:.2f}x |")

    # What the planner's model says the same comparison is worth on GPUs (one process over a
    # device map is the GPU analogue of the one-process, one-thread side: the stages run in turn).
    speeds = modelled["tokens_per_s"]
    device_map = speeds.get("device_map") or float("nan")
    print()
    print(f"Modelled on 2 x {modelled['gpu']} ({args.gpu_memory}, link {modelled['link']}; bytetune.plan.throughput, "
          "not measured) next to the measured CPU ratio:")
    print()
    print("| strategy | modelled GPU tokens/s | modelled vs device_map | measured CPU vs one process, 1 thread |")
    print("|---|---|---|---|")
    measured = {"device_map": 1.0, "pipeline": rows[0][1]["tokens_per_s"] / base1,
                "pipeline (interleaved_1f1b)": rows[1][1]["tokens_per_s"] / base1}
    for strategy, rate in speeds.items():
        fits = "" if modelled["fits"][strategy] else " (does not fit)"
        cpu = f"{measured[strategy]:.2f}x" if strategy in measured else "-"
        print(f"| {strategy}{fits} | {rate:.0f} | {rate / device_map:.2f}x | {cpu} |")


if __name__ == "__main__":
    main()
