"""Measure the peak memory of a few training steps, to check the planner against.

Run in a fresh process (``python bench/plan_measure.py '<json>'``) so nothing else lives in it.
The step is the trainer's: forward with labels, backward, gradient clipping, optimizer step,
``zero_grad(set_to_none=True)``. On CPU the peak is the process's resident-set high-water mark
(VmHWM) above its size just before the model is built; the mark is reset (``/proc/self/clear_refs``)
after the model is built, so the float weights that quantization frees do not count. On CUDA it
is ``torch.cuda.max_memory_allocated`` above the allocation before the model is built.
:func:`measure_in_subprocess` fixes glibc's mmap threshold in the child, so that freed buffers
leave the resident set and the peak is what the run needed (the planner states the allocator's
slack separately).

The JSON argument holds ``config`` (a transformers config dict with ``model_type``), ``seq_len``,
``micro_batch``, ``gradient_checkpointing``, ``dtype``, ``int8``, ``lora_r``, ``lora_dropout``,
``optimizer`` ("adamw" or "adamw8bit"), ``steps`` and ``device``. It prints one JSON line:
``{"peak_bytes": ..., "baseline_bytes": ...}``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bytetune.optim import AdamW8bit  # noqa: E402
from bytetune.quant_layers import quantize_model  # noqa: E402
from bytetune.quant_layers.lora import prepare_for_kbit_training  # noqa: E402


def rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(job: dict, device: torch.device, config_dict: dict):
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    dtype = getattr(torch, job["dtype"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    if job["int8"]:
        quantize_model(model, skip=("lm_head",))
        prepare_for_kbit_training(model, gradient_checkpointing=job["gradient_checkpointing"])
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if job["gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    lora = LoraConfig(r=job["lora_r"], lora_alpha=2 * job["lora_r"], lora_dropout=job["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if job["optimizer"] == "adamw8bit":
        optimizer = AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    return model, optimizer


def train_steps(model, optimizer, job: dict, device: torch.device, vocab: int, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (job["micro_batch"], job["seq_len"]), generator=generator).to(device)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss


def measure(job: dict) -> dict:
    device = torch.device(job.get("device", "cpu"))
    torch.manual_seed(0)
    # Warm up every code path on a one-block copy first: lazy imports and kernel set-up grow the
    # process too, and they are not the model's memory.
    warm_config = dict(job["config"])
    for key in ("n_layer", "num_hidden_layers"):
        if key in warm_config:
            warm_config[key] = 1
    model, optimizer = build(job, device, warm_config)
    warm_job = dict(job, seq_len=min(job["seq_len"], 16), micro_batch=1)
    train_steps(model, optimizer, warm_job, device, job["config"]["vocab_size"], 2)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = rss("VmRSS")
    model, optimizer = build(job, device, job["config"])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    train_steps(model, optimizer, job, device, job["config"]["vocab_size"], job.get("steps", 2))
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss("VmHWM")
    return {"peak_bytes": peak - baseline, "baseline_bytes": baseline, "device": device.type}


def measure_in_subprocess(job: dict, timeout: float = 600) -> dict:
    """``measure(job)`` in a fresh Python process (the only honest way to read a process peak)."""
    env = dict(os.environ)
    # glibc's dynamic mmap threshold keeps freed activation buffers resident in the heap, so the
    # resident peak would count the allocator's slack along with the memory needed. A fixed
    # threshold returns every buffer of 64 KiB and up to the system when freed.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result = subprocess.run(
        [sys.executable, __file__, json.dumps(job)], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
