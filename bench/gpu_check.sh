#!/usr/bin/env bash
# GPU check, one script for a lent GPU machine: the kernel and layer tests with the Triton kernels
# compiled for real (TRITON_INTERPRET=0), the compile gate against the card, then the benches at
# full size. Run there with no set-up step, on the image's own python3 (docs/gpu_check.md):
#
#     PYTHON=python3 bash bench/gpu_check.sh          (device tool: carry [".whl"])
#
# Wheels the image lacks (make gpu-bundle, in .whl/) are installed first into .site with
# `pip install --no-index --no-deps --target` and put on PYTHONPATH. Every table goes to $OUT when
# it is set (only files under $OUT come back from the GPU machine), else bench/results/: two files,
# gpu_check_<date>.txt (each section's summary) and gpu_check_<date>_full.log (everything).
# Budget: under 8 minutes wall on one GPU with a cold Triton cache (430 s of section budgets). Each
# section runs under its own timeout (its share, in brackets in its header; SIGKILL 10 s after the
# SIGINT): a slow section loses its own tail, never the later sections, and its summary line is
# printed even when it is cut.
#
#     bash bench/gpu_check.sh --dry-run          on a machine without a GPU (make device-replica):
#         the bundle install, every import, `pytest --collect-only` of every test the sections run,
#         the compile gate's CI subset compiled for sm_90, and the argument parsing of every
#         section (multi-GPU ones included), stopping before the first CUDA call.
#     bash bench/gpu_check.sh --dry-run=collect  the same without the compile gate (what CI runs).
set -uo pipefail  # no -e: a failing section must not hide the later ones
cd "$(dirname "$0")/.."

DRY_RUN=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=full ;;
        --dry-run=collect) DRY_RUN=collect ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument '$arg'; use --dry-run, --dry-run=collect or none" >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
export TRITON_INTERPRET=0
# Fixed kernel tiles in the tests: ~100 small shapes must not each pay an autotuning sweep (the
# benches below switch autotuning back on, as in training).
export BYTETUNE_AUTOTUNE=0
# pytest workers for the independent kernel and layer tests: Triton compiles on the CPU, so a cold
# cache is paid in parallel; the GPU is shared (tests are small next to its memory).
WORKERS="${WORKERS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"

if [ -n "$DRY_RUN" ]; then
    OUT_DIR="${OUT:-${TMPDIR:-/tmp}/bytetune_gpu_check_dry_run}"
else
    OUT_DIR="${OUT:-bench/results}"
fi
mkdir -p "$OUT_DIR"
STAMP="$(date -u +%F)"
SUMMARY="$OUT_DIR/gpu_check_$STAMP.txt"
FULL_LOG="$OUT_DIR/gpu_check_${STAMP}_full.log"
: > "$SUMMARY"
: > "$FULL_LOG"
START=$SECONDS
FAILED_SECTIONS=()

say() { echo "$*" | tee -a "$SUMMARY" | tee -a "$FULL_LOG" >/dev/null; echo "$*"; }

# --- the carried wheels (make gpu-bundle) -------------------------------------------------------
SITE="${SITE:-$PWD/.site}"
if compgen -G ".whl/*.whl" >/dev/null; then
    # By name from the folder: pip picks, per package, the wheel this Python can install (the
    # bundle holds multiprocess for 3.12, the image, and 3.11, the replica).
    names=$(for wheel in .whl/*.whl; do basename "$wheel" | cut -d- -f1; done | sort -u)
    bundle_id=$(cd .whl && ls -l -- *.whl | cksum)
    if [ "$(cat "$SITE/.bundle_id" 2>/dev/null)" != "$bundle_id" ]; then
        rm -rf "$SITE"
        # shellcheck disable=SC2086  # one word per package name
        if "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" --find-links .whl $names; then
            echo "$bundle_id" > "$SITE/.bundle_id"
        else
            say "!! installing .whl/ into $SITE failed: sections needing those packages will fail"
        fi
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    BUNDLE="$(ls .whl | wc -l) wheels from .whl/ in $SITE"
else
    BUNDLE="no .whl/ (make gpu-bundle): omegaconf, datasets, gguf, bitsandbytes, torchao must be installed"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# --- how a section runs ---------------------------------------------------------------------------
# run_section NAME BUDGET_S FILTER CMD...: CMD under `timeout` (SIGINT first, so pytest and Python
# print what they have; SIGKILL 10 s later), its whole output in the full log, FILTER's lines in
# the summary, then one closing line: ok, FAILED (exit N) or CUT at the budget.
run_section() {
    local name=$1 budget=$2 filter=$3
    shift 3
    say "== $name [${budget} s]"
    local began=$SECONDS
    timeout -s INT -k 10 "$budget" "$@" 2>&1 | tee -a "$FULL_LOG" | "$filter" | tee -a "$SUMMARY"
    local rc=${PIPESTATUS[0]} took=$((SECONDS - began))
    if [ "$rc" -eq 0 ]; then
        say "-- ok ($took s): $name"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "-- CUT at its ${budget} s budget: $name"
        FAILED_SECTIONS+=("$name (cut)")
    else
        say "-- FAILED (exit $rc, $took s): $name"
        FAILED_SECTIONS+=("$name")
    fi
}

# The summary's share of each section's output.
last_lines() { tail -n 8; }
quiet() { grep -v "^W1\|Failed to load\|GGUF\|Loading weights"; }
trainer_lines() {
    grep -E '"(steps|steps_this_session|parallel|tokens_per_s|peak_memory_bytes|final_train_loss|initial_eval_loss|final_eval_loss)"|^error|Error'
}
tables() { grep "^|\|^#\|Ratios\|Error\|^error"; }
dry_run_lines() { grep "^dry run\|^error\|Error"; }

# In a dry run the sections only queue what they would run; it is checked at the end in three
# processes (an import of torch and transformers costs seconds each): one `pytest --collect-only`
# of every test path, one bench/dry_run.py over every bench and trainer line.
DRY_TEST_PATHS=()
DRY_LINES=()

# tests NAME BUDGET_S K_EXPRESSION PATH...: the tests run (-n workers, a per-test timeout).
tests() {
    local name=$1 budget=$2 select=$3
    shift 3
    if [ -n "$DRY_RUN" ]; then
        say "== $name: queued for collection"
        DRY_TEST_PATHS+=("$@")
    else
        run_section "$name" "$budget" last_lines \
            "$PYTHON" -m pytest -q -p no:cacheprovider -n "$WORKERS" --timeout 120 -k "$select" "$@"
    fi
}

# bench NAME BUDGET_S FILTER SCRIPT ARGS...: a bench; in a dry run its imports and arguments.
bench() {
    local name=$1 budget=$2 filter=$3 script=$4
    shift 4
    if [ -n "$DRY_RUN" ]; then
        say "== $name: queued for argument parsing"
        DRY_LINES+=(--- "$script" "$@")
    else
        run_section "$name" "$budget" "$filter" "$PYTHON" "$script" "$@"
    fi
}

# train NAME BUDGET_S OVERRIDES...: train.py, under LAUNCH (empty or an `accelerate launch`
# prefix); in a dry run the recipe and every override are checked (--print-config, no model).
train() {
    local name=$1 budget=$2
    shift 2
    if [ -n "$DRY_RUN" ]; then
        say "== $name: queued for the recipe check"
        DRY_LINES+=(--- train.py "$@" --print-config)
    else
        run_section "$name" "$budget" trainer_lines "${LAUNCH[@]}" train.py "$@"
    fi
}

if [ -n "$DRY_RUN" ]; then
    DEVICE_NAME="dry run ($DRY_RUN) on $(uname -n), no CUDA call"
    run_section "imports: bytetune and every package a section needs" 120 last_lines "$PYTHON" -c '
import importlib, sys, torch, triton, transformers, peft, accelerate, safetensors, omegaconf, datasets, gguf
import accelerate.commands.launch  # the multi-GPU sections start through it
import bytetune, bytetune.kernels, bytetune.optim, bytetune.quant_layers, bytetune.plan, bytetune.trainer.trainer
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}")
for peer in ("bitsandbytes", "torchao"):
    try:
        importlib.import_module(peer)
    except Exception as error:  # a peer row is skipped, the check goes on
        print(f"{peer}: not importable here ({type(error).__name__}: {error}): its bench rows are skipped")
    else:
        print(f"{peer}: ok")
'
else
    DEVICE_NAME="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2>&1 | tail -n 1)"
fi
say "== bytetune gpu_check $(date -u +%FT%TZ) on $DEVICE_NAME; $BUNDLE; tables in $OUT_DIR"
if [ -n "$DRY_RUN" ]; then
    N_GPUS=0  # the multi-GPU sections' arguments are checked whatever the count
else
    N_GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi

# --- kernels vs references, compiled (includes the ~1e6-element optimizer sizes, GPU only) -------
# (the CPU-side compile-gate tests are left to the next section, which compiles for this card)
tests "kernel tests: block-wise, fused optimizer update, LLM.int8(), group-wise, fused CE" 115 \
    "not ci_subset and not oversized" tests/kernels

# The CPU-side compile gate predicts shared memory, registers and spills per config; here the
# same configs (the CI subset) are compiled for this card, loaded on it, and the driver's figures
# and the card's shared-memory limit are compared with the prediction. In a dry run: the same
# subset compiled for sm_90 (the H200) with this Triton, on the CPU.
if [ -z "$DRY_RUN" ]; then
    run_section "compile gate vs this card: bench/gpu_compile.py --device --subset" 45 quiet \
        "$PYTHON" bench/gpu_compile.py --device --subset
elif [ "$DRY_RUN" = full ]; then
    run_section "compile gate, CI subset for sm_90 on the CPU: bench/gpu_compile.py --subset --arch 90" 300 quiet \
        "$PYTHON" bench/gpu_compile.py --subset --arch 90 --output -
fi

# Int8Linear and GroupQuantLinear through the compiled kernels, and the CUDA no-sync test
# (torch.cuda.set_sync_debug_mode("error") over a LoRA model's forward and backward).
tests "layer tests on CUDA: Int8Linear, GroupQuantLinear, no host sync" 45 "not dynamo and not compiled" \
    tests/quant_layers/test_int8_linear.py tests/quant_layers/test_group_linear.py \
    tests/quant_layers/test_sync_free_and_compile.py

# --- benches: ratios against peers measured in the same run (autotuning on, as in training) ------
export BYTETUNE_AUTOTUNE=1
bench "bench/optim_step.py: step time, state bytes, GB/s vs a device copy, vs torch / bnb / torchao" 40 quiet \
    bench/optim_step.py
bench "bench/int8_linear.py: Int8Linear vs bf16 nn.Linear and bitsandbytes Linear8bitLt" 50 quiet \
    bench/int8_linear.py
bench "bench/group_gemm.py: W8A8 / W4A8 / W4A16 GEMMs vs bf16 nn.Linear" 35 quiet \
    bench/group_gemm.py

# --- trainer, planner and the end-to-end comparison ----------------------------------------------
# The bloom7b recipe shrunk to 2 layers with random weights: int8 base through the Triton kernels,
# bf16 autocast, gradient checkpointing, AdamW8bit, a checkpoint.
LAUNCH=("$PYTHON")
train "trainer: shrunken bloom7b_lora8 on CUDA (4 steps)" 40 \
    recipe=bloom7b_lora8 output_dir=/tmp/bytetune_gpu_check_trainer checkpoint.overwrite=true \
    model.from_config=true model.shrink.num_layers=2 model.shrink.hidden_size=256 model.shrink.num_heads=4 \
    model.shrink.vocab_size=512 model.tokenizer=bytes data.max_train_chars=200000 data.max_eval_chars=20000 \
    training.max_steps=4 schedule.warmup_steps=0 training.seq_len=256 eval.max_batches=2 checkpoint.every_steps=2 \
    logging.progress_bar=false
bench "planner vs measured peak (torch.cuda.max_memory_allocated; goal within 10 %)" 40 tables \
    bench/plan_vs_measured.py
bench "e2e: bytetune vs HF Trainer + PEFT + bitsandbytes (~350M BLOOM shape)" 40 tables \
    bench/e2e.py --shapes 350m --steps 10

# ==================================================================================================
# MULTI-GPU SECTIONS: each runs only where `N_GPUS` (torch.cuda.device_count()) is enough, else
# prints one "skipped" line; a dry run checks their arguments whatever the count. Add new
# multi-GPU sections (pipeline parallel, ...) here, each in its own `if` with its own budget,
# after FSDP2. Their budgets are not part of the one-GPU 8 minutes.
# ==================================================================================================

# FSDP2 over two GPUs (NCCL): the bloom7b recipe shrunk to 4 blocks, sharded over 2 processes:
# int8 codes, LoRA and 8-bit AdamW states per rank, bf16 autocast, a checkpoint through
# torch.distributed.checkpoint at step 2, then a resume from it to step 4. (schedule.warmup_steps=0:
# the recipe's 20 warm-up steps are refused for a 2-step run, found by the dry run.)
FSDP_ARGS=(recipe=bloom7b_lora8 parallel.strategy=fsdp output_dir=/tmp/bytetune_gpu_check_fsdp
    model.from_config=true model.shrink.num_layers=4 model.shrink.hidden_size=512 model.shrink.num_heads=8
    model.shrink.vocab_size=512 model.tokenizer=bytes data.max_train_chars=200000 data.max_eval_chars=20000
    training.seq_len=256 schedule.warmup_steps=0 eval.max_batches=2 checkpoint.every_steps=2 logging.progress_bar=false)
if [ -n "$DRY_RUN" ] || [ "$N_GPUS" -ge 2 ]; then
    LAUNCH=("$PYTHON" -m accelerate.commands.launch --config_file bytetune/recipe/accelerate/fsdp2.yaml
        --num_processes 2 --main_process_port 29561)
    [ -f bytetune/recipe/accelerate/fsdp2.yaml ] || say "!! bytetune/recipe/accelerate/fsdp2.yaml is missing"
    rm -rf /tmp/bytetune_gpu_check_fsdp
    train "FSDP2: shrunken bloom7b_lora8 over 2 GPUs, 2 steps and a checkpoint" 60 \
        "${FSDP_ARGS[@]}" training.max_steps=2
    train "FSDP2: resume from the step-2 checkpoint to step 4" 60 \
        "${FSDP_ARGS[@]}" training.max_steps=4 checkpoint.resume=true
    LAUNCH=("$PYTHON")
else
    say "== FSDP2 2-GPU sections skipped: $N_GPUS GPU(s) visible"
fi

# Pipeline parallel over two GPUs (NCCL, torchrun, 1F1B): bench/gpu_pipeline_section.sh saves a
# shrunken bloom7b_lora8, trains 2 steps with a per-stage checkpoint and resumes to step 4
# (~120 s). It skips itself on one GPU.
if [ -z "$DRY_RUN" ]; then
    RESULTS="$SUMMARY" PYTHON="$PYTHON" timeout 150 bash bench/gpu_pipeline_section.sh 2>&1 | tee -a "$FULL_LOG"
else
    [ -f bench/gpu_pipeline_section.sh ] || say "!! bench/gpu_pipeline_section.sh is missing"
fi

# (next multi-GPU section here)

# ==================================================================================================
if [ -n "$DRY_RUN" ]; then
    run_section "dry run: pytest --collect-only of every test the sections run" 240 last_lines \
        "$PYTHON" -m pytest -q -p no:cacheprovider -n 0 --timeout 120 --collect-only "${DRY_TEST_PATHS[@]}"
    run_section "dry run: every bench's imports and arguments, every trainer line's recipe" 300 dry_run_lines \
        "$PYTHON" bench/dry_run.py "${DRY_LINES[@]:1}"
fi
say "== gpu_check done in $((SECONDS - START)) s: ${#FAILED_SECTIONS[@]} section(s) failed or cut"
for name in "${FAILED_SECTIONS[@]}"; do say "   - $name"; done
say "   summary: $SUMMARY; full output: $FULL_LOG"
[ "${#FAILED_SECTIONS[@]}" -eq 0 ]
