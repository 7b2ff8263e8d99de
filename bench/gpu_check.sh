#!/usr/bin/env bash
# GPU check, one script for a lent GPU machine: the kernel tests with the Triton kernels compiled
# for real (TRITON_INTERPRET=0), then the benches at full size, every table tee'd into
# bench/results/gpu_<date>.txt. Budget: under 8 minutes in total; each line's timeout is its share
# (sum 465 s, +120 s for the FSDP2 step on a machine with 2+ GPUs), so a slow section loses its
# own tail, never the later sections.
# Run: `make gpu-check` (or `bash bench/gpu_check.sh` with PYTHON pointing at a CUDA torch).
set -uo pipefail  # no -e: a failing section must not hide the later ones
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Fixed kernel tiles in the tests: ~100 small shapes must not each pay an autotuning sweep.
export BYTETUNE_AUTOTUNE=0
PYTHON="${PYTHON:-python}"
mkdir -p bench/results
RESULTS="bench/results/gpu_$(date +%F).txt"
section() { echo "== $*" | tee -a "$RESULTS"; }
quiet() { grep -v "^W1\|Failed to load\|GGUF\|Loading weights"; }
section "bytetune gpu_check $(date -u +%FT%TZ) on $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')"

# --- kernels vs references, compiled (includes the ~1e6-element optimizer sizes, GPU only) -----
section "kernel tests: block-wise, fused optimizer update, LLM.int8(), group-wise (ZeroQuant)"
# (the CPU-side compile-gate tests are left to the next section, which compiles for this card)
timeout 110 "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels -k "not ci_subset and not oversized" 2>&1 \
    | tail -n 8 | tee -a "$RESULTS"
# The CPU-side compile gate predicts shared memory, registers and spills per config; here the
# same configs (the CI subset) are compiled for this card, loaded on it, and the driver's
# figures and the card's shared-memory limit are compared with the prediction.
section "compile gate vs this card: bench/gpu_compile.py --device --subset"
timeout 45 "$PYTHON" bench/gpu_compile.py --device --subset 2>&1 | quiet | tee -a "$RESULTS"
section "layer tests on CUDA: Int8Linear, GroupQuantLinear"
timeout 40 "$PYTHON" -m pytest -q -p no:cacheprovider tests/quant_layers/test_int8_linear.py \
    tests/quant_layers/test_group_linear.py 2>&1 | tail -n 8 | tee -a "$RESULTS"

# --- benches: ratios against peers measured in the same run (autotuning on, as in training) ----
export BYTETUNE_AUTOTUNE=1
section "bench/optim_step.py: step time, state bytes, GB/s vs a device copy, vs torch / bnb / torchao"
timeout 40 "$PYTHON" bench/optim_step.py 2>&1 | quiet | tee -a "$RESULTS"
section "bench/int8_linear.py: Int8Linear vs bf16 nn.Linear and bitsandbytes Linear8bitLt"
timeout 60 "$PYTHON" bench/int8_linear.py 2>&1 | quiet | tee -a "$RESULTS"
section "bench/group_gemm.py: W8A8 / W4A8 / W4A16 GEMMs vs bf16 nn.Linear"
timeout 40 "$PYTHON" bench/group_gemm.py 2>&1 | quiet | tee -a "$RESULTS"

# --- trainer, planner and the end-to-end comparison --------------------------------------------
# The bloom7b recipe shrunk to 2 layers with random weights: int8 base through the Triton
# kernels, bf16 autocast, gradient checkpointing, AdamW8bit, a checkpoint.
section "trainer: shrunken bloom7b_lora8 on CUDA (4 steps)"
timeout 40 "$PYTHON" train.py recipe=bloom7b_lora8 output_dir=/tmp/bytetune_gpu_check_trainer checkpoint.overwrite=true \
    model.from_config=true model.shrink.num_layers=2 model.shrink.hidden_size=256 model.shrink.num_heads=4 \
    model.shrink.vocab_size=512 model.tokenizer=bytes data.max_train_chars=200000 data.max_eval_chars=20000 \
    training.max_steps=4 schedule.warmup_steps=0 training.seq_len=256 eval.max_batches=2 checkpoint.every_steps=2 logging.progress_bar=false \
    2>&1 | grep -E '"(steps|tokens_per_s|peak_memory_bytes|final_train_loss|initial_eval_loss|final_eval_loss)"|^error' \
    | tee -a "$RESULTS"
section "planner vs measured peak (torch.cuda.max_memory_allocated; goal within 10 %)"
timeout 45 "$PYTHON" bench/plan_vs_measured.py 2>&1 | grep "^|\|^#\|Error" | tee -a "$RESULTS"
section "e2e: bytetune vs HF Trainer + PEFT + bitsandbytes (~350M BLOOM shape)"
timeout 45 "$PYTHON" bench/e2e.py --shapes 350m --steps 10 2>&1 | grep "^|\|^#\|Ratios\|Error" | tee -a "$RESULTS"

# --- FSDP2 over two GPUs (NCCL), only where there are two ----------------------------------------
# The bloom7b recipe shrunk to 4 blocks, sharded over 2 processes: int8 codes, LoRA and 8-bit
# AdamW states per rank, bf16 autocast, a checkpoint through torch.distributed.checkpoint at step
# 2, then a resume from it to step 4.
N_GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [ "$N_GPUS" -ge 2 ]; then
    section "FSDP2: shrunken bloom7b_lora8 over 2 GPUs (accelerate launch, bytetune/recipe/accelerate/fsdp2.yaml)"
    FSDP_ARGS=(train.py recipe=bloom7b_lora8 parallel.strategy=fsdp output_dir=/tmp/bytetune_gpu_check_fsdp
        model.from_config=true model.shrink.num_layers=4 model.shrink.hidden_size=512 model.shrink.num_heads=8
        model.shrink.vocab_size=512 model.tokenizer=bytes data.max_train_chars=200000 data.max_eval_chars=20000
        training.seq_len=256 eval.max_batches=2 checkpoint.every_steps=2 logging.progress_bar=false)
    FSDP_LAUNCH=("$PYTHON" -m accelerate.commands.launch --config_file bytetune/recipe/accelerate/fsdp2.yaml
        --num_processes 2 --main_process_port 29561)
    rm -rf /tmp/bytetune_gpu_check_fsdp
    timeout 60 "${FSDP_LAUNCH[@]}" "${FSDP_ARGS[@]}" training.max_steps=2 2>&1 \
        | grep -E '"(steps|parallel|peak_memory_bytes|final_train_loss)"|^error|Error' | tee -a "$RESULTS"
    timeout 60 "${FSDP_LAUNCH[@]}" "${FSDP_ARGS[@]}" training.max_steps=4 checkpoint.resume=true 2>&1 \
        | grep -E '"(steps|steps_this_session|parallel|peak_memory_bytes|final_train_loss|final_eval_loss)"|^error|Error' \
        | tee -a "$RESULTS"
else
    section "FSDP2 2-GPU smoke step skipped: $N_GPUS GPU(s) visible"
fi
