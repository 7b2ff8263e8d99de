"""The CPU int8 path against fp32 on SmolLM2-135M's shapes, every ratio from one run.

1. The exact int32 product of int8 codes: torch._int_mm, fp32 K-chunks, float64 (the oracle),
   against an fp32 matmul of the same shape; and which way the run-time probe picked.
2. Int8Linear (and GroupQuantLinear W8A8 / W4A8) forward + backward (input gradient only: the
   base is frozen, as in LoRA) against a frozen fp32 nn.Linear, per SmolLM2 linear, and summed
   over one decoder block (q, k, v, o, gate, up, down).
3. One LoRA training step (r=16 on every linear, 4 x 128 tokens, bytetune AdamW8bit, the trainer's
   fused loss) of the real SmolLM2-135M with the int8 base (bytetune.quantize_model) against the
   fp32 base.

Timing: the candidates of a case run in turns, round after round, so a burst of load from other
processes on a shared machine hits all of them; each reports the median over rounds of the wall
time and of the process CPU time per call. Ratios are ``t_fp32 / t`` (above 1 = faster).

    python bench/int8_cpu.py                     # all three parts
    python bench/int8_cpu.py --parts 1 2         # no model load
    python bench/int8_cpu.py --threads 1         # one thread: steadier on a shared machine
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bytetune.kernels.cpu_int8_gemm import (  # noqa: E402
    cpu_int8_gemm_probe_info,
    int32_matmul_nt_exact,
    int32_matmul_nt_fp32,
    int32_matmul_nt_int_mm,
)
from bytetune.quant_layers import Int8Linear  # noqa: E402
from bytetune.quant_layers.group_linear import GroupQuantLinear  # noqa: E402

TOKENS = 4 * 128
HIDDEN, INTERMEDIATE, KV = 576, 1536, 3 * 64  # SmolLM2-135M: 9 heads, 3 KV heads of 64
# (name, in_features, out_features), one decoder block's linears.
BLOCK_LINEARS = [
    ("q_proj", HIDDEN, HIDDEN),
    ("k_proj", HIDDEN, KV),
    ("v_proj", HIDDEN, KV),
    ("o_proj", HIDDEN, HIDDEN),
    ("gate_proj", HIDDEN, INTERMEDIATE),
    ("up_proj", HIDDEN, INTERMEDIATE),
    ("down_proj", INTERMEDIATE, HIDDEN),
]
DISTINCT_SHAPES = sorted({(i, o) for _, i, o in BLOCK_LINEARS})


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def interleaved_ms(candidates: dict, rounds: int, calls: int) -> dict:
    """{name: (median wall ms, median CPU ms) per call}; the candidates take turns, round by round.

    CPU time (this process, all its threads) is what the work cost even while other processes
    held the cores; with one thread it is the better measure on a shared machine.
    """
    for fn in candidates.values():
        fn()  # warm-up: allocator, oneDNN primitive creation
    wall = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall[name].append((time.perf_counter() - start_wall) / calls * 1e3)
            cpu[name].append((time.process_time() - start_cpu) / calls * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in candidates}


def format_times(times: dict, base: str) -> str:
    base_wall, base_cpu = times[base]
    return " | ".join(
        f"{name} {w:7.3f} ms {base_wall / w:4.2f}x, cpu {c:7.3f} ms {base_cpu / c:4.2f}x"
        for name, (w, c) in times.items()
    )


def gemm_part(rounds: int) -> None:
    print("\n## 1. Exact int8 x int8 -> int32 product, M = tokens, ratio = t(fp32 matmul) / t")
    gen = torch.Generator().manual_seed(0)
    for k, n in [(i, o) for i, o in DISTINCT_SHAPES]:
        a = torch.randint(-127, 128, (TOKENS, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        af, bf = a.float(), b.float()
        times = interleaved_ms(
            {
                "fp32 matmul": lambda: af @ bf.t(),
                "_int_mm": lambda: int32_matmul_nt_int_mm(a, b),
                "fp32 K-chunks": lambda: int32_matmul_nt_fp32(a, b),
                "float64": lambda: int32_matmul_nt_exact(a, b),
            },
            rounds,
            calls=3,
        )
        print(f"{TOKENS}x{k}x{n}: " + format_times(times, "fp32 matmul"), flush=True)


def _layers(in_features: int, out_features: int) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    nn.init.normal_(linear.weight, std=0.02)
    layers = {
        "fp32 nn.Linear": linear,
        "Int8Linear t=6": Int8Linear.from_linear(linear, threshold=6.0),
        "Int8Linear t=0": Int8Linear.from_linear(linear, threshold=0.0),
        "Group W8A8": GroupQuantLinear.from_linear(linear, bits=8, group_size=128, act_bits=8),
        "Group W4A8": GroupQuantLinear.from_linear(linear, bits=4, group_size=128, act_bits=8),
    }
    for layer in layers.values():
        layer.requires_grad_(False)
    return layers


def _activations(in_features: int) -> torch.Tensor:
    # Normal activations below the threshold, plus one outlier column (|x| ~ 10-20), as LLM
    # activations have: threshold 6 takes the decomposition path, threshold 0 does not.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, in_features, generator=gen).clamp_(-5.5, 5.5)
    x[:, 7] = 10.0 + 10.0 * torch.rand(TOKENS, generator=gen)
    return x


def layer_part(rounds: int) -> None:
    print("\n## 2. Frozen linear layers, forward + backward (input gradient), fp32 activations")
    block_totals: dict = {}
    for name, in_features, out_features in BLOCK_LINEARS:
        layers = _layers(in_features, out_features)
        x = _activations(in_features).requires_grad_(True)
        grad_y = torch.randn(TOKENS, out_features, generator=torch.Generator().manual_seed(2))
        for mode in ("forward", "backward", "forward+backward"):
            candidates = {}
            for layer_name, layer in layers.items():
                if mode == "forward":
                    def step(layer=layer):
                        with torch.no_grad():
                            layer(x)
                elif mode == "backward":
                    y = layer(x)

                    def step(y=y):
                        torch.autograd.grad(y, x, grad_y, retain_graph=True)
                else:
                    def step(layer=layer):
                        torch.autograd.grad(layer(x), x, grad_y)
                candidates[layer_name] = step
            times = interleaved_ms(candidates, rounds, calls=2)
            print(f"{name} {in_features}->{out_features} {mode}: " + format_times(times, "fp32 nn.Linear"), flush=True)
            if mode == "forward+backward":
                for layer_name, (wall, cpu) in times.items():
                    total = block_totals.setdefault(layer_name, [0.0, 0.0])
                    total[0] += wall
                    total[1] += cpu
    print("one decoder block (7 linears), forward+backward summed: " + format_times(block_totals, "fp32 nn.Linear"))


def model_part(steps: int) -> None:
    from peft import LoraConfig, get_peft_model

    from bytetune.optim import AdamW8bit
    from bytetune.quant_layers import quantize_model
    from bytetune.quant_layers.lora import prepare_for_kbit_training, register_int8_lora
    from bytetune.trainer.loss import summed_token_loss
    from bytetune.recipe.schema import ModelConfig
    from bytetune.loaders.models import load_gguf_cached, smollm2_gguf_path

    print(f"\n## 3. SmolLM2-135M LoRA training step (r=16, all linears, {TOKENS // 128} x 128 tokens, AdamW8bit)")
    path = smollm2_gguf_path()

    def build(int8_base: bool):
        model, _ = load_gguf_cached(path.parent, path.name, torch.float32, ModelConfig.cache_dir)
        if int8_base:
            quantize_model(model, skip=("lm_head",))
            prepare_for_kbit_training(model, gradient_checkpointing=False)
            config = register_int8_lora(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                   target_modules="all-linear", task_type="CAUSAL_LM"))
        else:
            model.requires_grad_(False)
            config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, AdamW8bit(params, lr=1e-4)

    sides = {"fp32 base": build(False), "int8 base": build(True)}
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 49152, (TOKENS // 128, 128), generator=gen) for _ in range(steps + 1)]

    def train_step(side, ids):
        model, params, optimizer = sides[side]
        summed, count = summed_token_loss(model, {"input_ids": ids, "labels": ids}, fused=True)  # the trainer's loss
        (summed / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    wall = {side: [] for side in sides}
    cpu = {side: [] for side in sides}
    for i, ids in enumerate(batches):
        for side in sides:  # alternate: both sides see the same load from other processes
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            train_step(side, ids)
            if i > 0:  # the first step is warm-up
                wall[side].append((time.perf_counter() - start_wall) * 1e3)
                cpu[side].append((time.process_time() - start_cpu) * 1e3)
    times = {side: (statistics.median(wall[side]), statistics.median(cpu[side])) for side in sides}
    print(f"{steps} steps each, alternating, median per step: " + format_times(times, "fp32 base"))
    print("tokens/s (median wall step): " + " | ".join(f"{s} {TOKENS / (w / 1e3):6.1f}" for s, (w, _) in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds of turns per case (parts 1 and 2)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per side (part 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3],
                        help="which parts to run (3 loads SmolLM2)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = cpu_int8_gemm_probe_info()
    print(f"# CPU int8 path vs fp32: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, get_cpu_capability() = {probe['cpu_capability']}, "
          f"{torch.get_num_threads()} threads")
    print(f"probe: picked {probe['choice']!r}; " + ", ".join(f"{k}={v}" for k, v in probe.items()
                                                             if k not in ("choice", "cpu_capability")))
    if 1 in args.parts:
        gemm_part(args.rounds)
    if 2 in args.parts:
        layer_part(args.rounds)
    if 3 in args.parts:
        model_part(args.steps)


if __name__ == "__main__":
    main()
