"""Memory planner: byte counts against real objects, device maps, verdicts, recipes and the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BloomConfig

from bytetune.plan import Device, PlanSpec, Planner, parse_devices, plan_memory
from bytetune.plan.devices import CUDA_CONTEXT_BYTES, GiB, parse_size

ROOT = Path(__file__).resolve().parents[2]
# Odd sizes on purpose: 72 is not a multiple of the 8-bit optimizer's 256-element blocks.
SMALL = dict(hidden_size=72, n_layer=3, n_head=4, vocab_size=500)


def small_spec(**overrides) -> PlanSpec:
    fields = dict(model_config=BloomConfig(**SMALL), seq_len=24, micro_batch=2, gradient_checkpointing=False,
                  compute_dtype="float32", lora_r=4, lora_alpha=8, lora_dropout=0.0, name="small-bloom")
    fields.update(overrides)
    return PlanSpec(**fields)


def real_lora_model(spec: PlanSpec):
    """The model the trainer builds for ``spec``: int8 base, PEFT LoRA, on CPU with real storage."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bytetune.quant_layers import quantize_model
    from bytetune.quant_layers.lora import prepare_for_kbit_training, register_int8_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(spec.model_config, dtype=torch.float32)
    quantize_model(model, skip=("lm_head",))
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    lora = register_int8_lora(LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules="all-linear"))
    return get_peft_model(model, lora)


def test_parse_devices_and_sizes():
    devices = parse_devices("2x24GiB,1x80GB")
    assert [d.name for d in devices] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [d.capacity for d in devices] == [24 * 2**30, 24 * 2**30, 80 * 10**9]
    assert parse_devices("cpu:512MiB") == [Device("cpu", 512 * 2**20)]
    assert parse_size("1.5GiB") == 3 * 2**29
    for bad in ("8x24", "eight x 24GiB", "cpu"):
        with pytest.raises(ValueError):
            parse_devices(bad)


def test_static_bytes_match_the_real_int8_lora_model():
    spec = small_spec()
    planner = Planner(spec)
    totals = planner.totals()
    model = real_lora_model(spec)
    from bytetune.quant_layers import Int8Linear

    int8_bytes = sum(
        m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * m.weight_scale.element_size()
        for m in model.modules() if isinstance(m, Int8Linear)
    )
    int8_params = {id(m.weight) for m in model.modules() if isinstance(m, Int8Linear)}
    seen, other = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or id(p) in int8_params or "lora_" in name:
            continue
        seen.add(id(p))
        other += p.numel() * p.element_size()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert totals["quantized_weights"] == int8_bytes
    assert totals["other_weights"] == other
    assert totals["lora_numel"] == sum(p.numel() for p in lora)
    assert totals["lora_params"] == sum(p.numel() * p.element_size() for p in lora)
    assert totals["parameters"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - sum(
        p.numel() for p in lora
    )


@pytest.mark.parametrize("bits", [8, 32])
def test_optimizer_state_bytes_match_a_real_step(bits):
    from bytetune.optim import AdamW8bit

    # r=40 makes A = 40 x 72 = 2880 elements (< 4096: fp32 state) and B = 40 x 216 = 8640 (8-bit).
    spec = small_spec(lora_r=40, optimizer_bits=bits, optimizer="adamw8bit" if bits == 8 else "adamw")
    planner = Planner(spec)
    model = real_lora_model(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    if bits == 8:
        optimizer = AdamW8bit(params, lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    state_bytes = sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and k != "step"
    )
    assert planner.totals()["optimizer_states"] == state_bytes
    assert planner.totals()["lora_grads"] == sum(p.grad.numel() * p.grad.element_size() for p in params)


def test_checkpointing_keeps_only_block_inputs():
    plain = Planner(small_spec())
    ckpt = Planner(small_spec(gradient_checkpointing=True))
    hidden_bytes = 2 * 24 * SMALL["hidden_size"] * 4
    assert ckpt.trace.block_input == hidden_bytes
    assert plain.activations(False) - plain.activations(True) == SMALL["n_layer"] * (
        plain.trace.per_block - hidden_bytes
    )
    # A block keeps far more than its input when not checkpointed (attention scores, MLP, LoRA).
    assert plain.trace.per_block > 5 * hidden_bytes
    # Twice the tokens: a block keeps at least twice as much (attention scores grow faster).
    longer = Planner(small_spec(seq_len=48))
    assert longer.trace.per_block >= 2 * plain.trace.per_block


def test_device_map_keeps_blocks_whole_and_sums_per_device():
    config = BloomConfig(hidden_size=512, n_layer=12, n_head=8, vocab_size=4000)
    spec = small_spec(model_config=config, compute_dtype="bfloat16", gradient_checkpointing=True, quantization="int8")
    planner = Planner(spec)
    per_block = planner.costs["transformer.h.0"].static
    single = planner.plan("1x1000GiB").devices[0]
    # Devices that each hold a bit over half of the model besides the CUDA context.
    capacity = CUDA_CONTEXT_BYTES + (single.total - CUDA_CONTEXT_BYTES) // 2 + 2 * per_block
    plan = planner.plan(f"4x{capacity}B")
    assert plan.fits, plan.table()
    blocks = {f"transformer.h.{i}" for i in range(12)}
    for name in plan.device_map:
        # a block is placed whole: never one of its submodules on its own
        assert not any(name.startswith(b + ".") for b in blocks), name
    used = [d for d in plan.devices if d.units]
    assert len(used) >= 2
    assert sum(d.quantized_weights for d in plan.devices) == plan.totals["quantized_weights"]
    assert sum(d.lora_params for d in plan.devices) == plan.totals["lora_params"]
    for d in plan.devices:
        assert d.headroom == d.device.capacity - d.total and d.fits
    for d in used:
        assert d.total > d.allocated  # runtime overhead counted on every used device
    # The same model on devices that hold less than one block does not fit, and says so.
    tiny = planner.plan(f"2x{per_block // 2}B")
    assert not tiny.fits
    assert "does not fit" in tiny.advice()


def test_min_devices_is_the_smallest_that_fits():
    config = BloomConfig(hidden_size=512, n_layer=10, n_head=8, vocab_size=4000)
    spec = small_spec(model_config=config, compute_dtype="bfloat16", gradient_checkpointing=True)
    planner = Planner(spec)
    single = planner.plan("1x1000GiB").devices[0]
    size = CUDA_CONTEXT_BYTES + (single.total - CUDA_CONTEXT_BYTES) // 3
    n = planner.find_min_devices(size)
    assert n is not None and n >= 2
    assert planner.plan(f"{n}x{size}B").fits
    assert not planner.plan(f"{n - 1}x{size}B").fits


def test_recipe_plans_use_the_bundled_configs():
    from bytetune.recipe.schema import load_recipe

    recipe = load_recipe("bloom_lora8", ["training.seq_len=512"])
    from bytetune.plan import spec_from_recipe

    spec = spec_from_recipe(recipe)
    assert (spec.seq_len, spec.micro_batch, spec.gradient_checkpointing) == (512, 1, True)
    assert spec.model_config.n_layer == 70 and spec.model_config.hidden_size == 14336
    assert spec.quantization == "int8" and spec.optimizer_bits == 8 and spec.lora_r == 16
    plan = plan_memory(load_recipe("tiny_lora8"), "cpu:4GiB", find_min=False)
    assert plan.fits and plan.devices[0].device.kind == "cpu"


@pytest.mark.slow
def test_cli_prints_json_and_asks_for_devices():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "bytetune.plan", "recipe=tiny_lora8", "gpus=2x1GiB", "training.micro_batch=2", "json=-"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["micro_batch"] == 2 and data["fits"] and data["min_devices"] == 1
    assert len(data["devices"]) == 2 and data["devices"][0]["device"] == "cuda:0"
    bad = subprocess.run([sys.executable, "-m", "bytetune.plan", "recipe=tiny_lora8"], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)
    assert bad.returncode == 2 and "gpus=" in bad.stderr


@pytest.mark.slow
def test_bloom_lora8_as_shipped_fits_8x24gib_with_headroom_everywhere():
    from bytetune.recipe.schema import load_recipe

    recipe = load_recipe("bloom_lora8")
    plan = plan_memory(recipe, "8x24GiB", find_min=False)
    assert plan.fits, plan.table()
    assert all(d.headroom > 0 for d in plan.devices), plan.table()
    # BLOOM-176B from its shapes: 70 blocks of int8 linears (qkv 3H x H, dense H x H, 4H x H,
    # H x 4H) with a float32 scale per output row, and the tied word embeddings in int8 with a
    # float32 scale per row.
    h, v, layers = 14336, 250880, 70
    block = 12 * h * h + 4 * (3 * h + h + 4 * h + h)
    assert plan.totals["quantized_weights"] == layers * block + v * h + 4 * v
    # Balanced: every block placed whole once; the device with the embeddings and the loss holds fewer.
    blocks = [sum(1 for u in d.units if u.rsplit(".", 1)[-1].isdigit()) for d in plan.devices]
    assert sum(blocks) == layers and not plan.unplaced
    assert plan.device_map["lm_head"] == plan.device_map["transformer.word_embeddings"] == 0
    assert blocks[0] < min(blocks[1:])
    # The longest that fits: 1024 tokens do not (bench/results/plan_bloom_lora8.md).
    longer = plan_memory(load_recipe("bloom_lora8", ["training.seq_len=1024"]), "8x24GiB", find_min=False)
    assert not longer.fits
