#!/usr/bin/env bash
# GPU checks for bytetune: on a CUDA machine, run the kernel tests with the Triton kernels
# compiled for real (TRITON_INTERPRET=0), then the benches, tee-ing every table into
# bench/results/gpu_<date>.txt. Budget: under 8 minutes in total. Each section appends itself.
set -uo pipefail  # no -e: a failing section must not hide the later ones
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
mkdir -p bench/results
RESULTS="bench/results/gpu_$(date +%F).txt"
echo "== bytetune gpu_check $(date -u +%FT%TZ) on $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')" | tee -a "$RESULTS"

# --- LLM.int8() kernels (bytetune/kernels/int8_matmul.py) and Int8Linear bench --------------
# Tests: one fixed tile config (BYTETUNE_AUTOTUNE=0) so ~100 small cases do not each pay a
# tuning sweep; at most 1.5 min. Then the matmul tests once more with autotuning (1 min at
# most). Bench: autotuned, as in training; at most 2.5 min (rows print as measured).
echo "== int8 kernel tests (compiled)" | tee -a "$RESULTS"
BYTETUNE_AUTOTUNE=0 timeout 90 "$PYTHON" -m pytest -q tests/kernels/test_int8_matmul.py 2>&1 | tail -n 15 | tee -a "$RESULTS"
echo "== int8 matmul / grad_input tests with autotuning on (the configs the bench uses)" | tee -a "$RESULTS"
timeout 60 "$PYTHON" -m pytest -q tests/kernels/test_int8_matmul.py \
    -k "(int8_matmul_matches or grad_input_matches) and (17 or 64)" 2>&1 | tail -n 15 | tee -a "$RESULTS"
echo "== bench/int8_linear.py" | tee -a "$RESULTS"
timeout 150 "$PYTHON" bench/int8_linear.py 2>&1 | grep -v "^W\|Failed to load" | tee -a "$RESULTS"

# --- Int8Linear layer (bytetune/quant_layers) and SmolLM2 int8 quality -----------------------
# Layer tests take the `device` fixture, so on CUDA they run the compiled Triton path (1 min at
# most). The quality bench loads SmolLM2 (~30 s) and compares fp32, ours at 6.0 / 0 and
# bitsandbytes on 8192 held-out tokens (2 min at most).
echo "== Int8Linear tests on CUDA" | tee -a "$RESULTS"
timeout 60 "$PYTHON" -m pytest -q tests/quant_layers/test_int8_linear.py 2>&1 | tail -n 15 | tee -a "$RESULTS"
echo "== bench/int8_quality.py (CUDA)" | tee -a "$RESULTS"
timeout 120 "$PYTHON" bench/int8_quality.py --tokens 8192 2>&1 | grep -v "^W\|Failed to load\|GGUF\|Loading weights" | tee -a "$RESULTS"

# --- issue 2: block-wise quantization and fused 8-bit optimizer kernels (from the optim branch) --
echo "== issue 2: block-wise quantization and fused 8-bit optimizer kernels (includes ~1e6 sizes on GPU)" | tee -a "$RESULTS"
timeout 180 "$PYTHON" -m pytest -q tests/kernels/test_blockwise.py tests/kernels/test_optim_update.py 2>&1 | tail -n 5 | tee -a "$RESULTS"
echo "== issue 2: optimizer step time, state bytes, GB/s vs device copy" | tee -a "$RESULTS"
timeout 150 "$PYTHON" bench/optim_step.py 2>&1 | tee -a "$RESULTS"
echo "== issue 2: quantization error, dynamic vs linear 8-bit" | tee -a "$RESULTS"
timeout 60 "$PYTHON" bench/quant_error.py 2>&1 | tee -a "$RESULTS"

# --- issue 4: the trainer on CUDA (bytetune/trainer) ------------------------------------------
# The bloom7b recipe shrunk to 2 layers with random weights: int8 base through the Triton
# kernels, bf16 autocast, gradient checkpointing, AdamW8bit, a checkpoint; 1 min at most.
echo "== issue 4: trainer, shrunken bloom7b_lora8 on CUDA (4 steps)" | tee -a "$RESULTS"
timeout 60 "$PYTHON" train.py recipe=bloom7b_lora8 output_dir=/tmp/bytetune_gpu_check_trainer \
    model.from_config=true model.shrink.num_layers=2 model.shrink.hidden_size=256 model.shrink.num_heads=4 \
    model.shrink.vocab_size=512 model.tokenizer=bytes data.max_train_chars=200000 data.max_eval_chars=20000 \
    training.max_steps=4 training.seq_len=256 eval.max_batches=2 checkpoint.every_steps=2 logging.progress_bar=false \
    2>&1 | grep -E '"(steps|tokens_per_s|peak_memory_bytes|final_train_loss|initial_eval_loss|final_eval_loss)"|^error' \
    | tee -a "$RESULTS"

# --- issue 5: memory planner vs measured, and the end-to-end bench vs HF + PEFT + bitsandbytes --
# Planner: three training runs (2 steps each, fresh processes) of the ~350M / ~1B BLOOM shapes,
# predicted vs torch.cuda.max_memory_allocated (goal: within 10 %); 3 min at most.
# e2e: bytetune vs HF Trainer + PEFT + bnb on the ~350M shape, 10 timed steps; 3 min at most.
echo "== issue 5: planner vs measured peak (CUDA)" | tee -a "$RESULTS"
timeout 180 "$PYTHON" bench/plan_vs_measured.py 2>&1 | grep "^|\|^#\|Error" | tee -a "$RESULTS"
echo "== issue 5: e2e bytetune vs HF Trainer + PEFT + bitsandbytes (CUDA, ~350M)" | tee -a "$RESULTS"
timeout 180 "$PYTHON" bench/e2e.py --shapes 350m --steps 10 2>&1 | grep "^|\|^#\|Ratios\|Error" | tee -a "$RESULTS"
