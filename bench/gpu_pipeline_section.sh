#!/usr/bin/env bash
# GPU check, pipeline section (for bench/gpu_check.sh; runs on its own too): a 2-stage pipeline
# over 2 GPUs (NCCL) when 2 or more are visible, skipped on one. The bloom7b_lora8 recipe shrunk
# to 4 blocks is saved once as a float safetensors checkpoint; each stage reads and quantizes
# only its own blocks of it, trains 2 steps with a checkpoint (per-stage adapters and 8-bit
# AdamW states), then a second launch resumes from it to step 4. Budget: ~120 s.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
RESULTS="${RESULTS:-/dev/null}"
section() { echo "== $*" | tee -a "$RESULTS"; }
N_GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [ "$N_GPUS" -ge 2 ]; then
    section "pipeline: shrunken bloom7b_lora8, 2 stages over 2 GPUs (torchrun, 1F1B, 4 micro-batches)"
    PP_MODEL=/tmp/bytetune_gpu_check_pp_model
    rm -rf "$PP_MODEL" /tmp/bytetune_gpu_check_pp
    timeout 60 "$PYTHON" - "$PP_MODEL" <<'EOF' 2>&1 | grep -E "^saved|Error" | tee -a "$RESULTS"
import sys
from bytetune.recipe import load_recipe
from bytetune.loaders.models import load_base_model
cfg = load_recipe("bloom7b_lora8", {"model.from_config": True, "model.shrink.num_layers": 4,
                                    "model.shrink.hidden_size": 512, "model.shrink.num_heads": 8,
                                    "model.shrink.vocab_size": 512, "model.tokenizer": "bytes"})
base, tokenizer = load_base_model(cfg)
base.save_pretrained(sys.argv[1]); tokenizer.save_pretrained(sys.argv[1])
print("saved", sys.argv[1], sum(p.numel() for p in base.parameters()), "parameters")
EOF
    PP_ARGS=(train.py recipe=bloom7b_lora8 parallel.strategy=pipeline output_dir=/tmp/bytetune_gpu_check_pp
        model.from_config=false model.name_or_path=$PP_MODEL model.tokenizer=bytes model.device_map=null quantization.embeddings=null
        data.max_train_chars=200000 data.max_eval_chars=20000 training.seq_len=256 training.micro_batch_size=1
        training.grad_accum_steps=4 schedule.warmup_steps=0 eval.max_batches=2 checkpoint.every_steps=2 logging.progress_bar=false)
    timeout 60 "$PYTHON" -m torch.distributed.run --nproc_per_node 2 --master_port 29562 "${PP_ARGS[@]}" \
        training.max_steps=2 2>&1 \
        | grep -E '"(steps|parallel|tokens_per_s|peak_memory_bytes|final_train_loss)"|^error|Error' | tee -a "$RESULTS"
    timeout 60 "$PYTHON" -m torch.distributed.run --nproc_per_node 2 --master_port 29562 "${PP_ARGS[@]}" \
        training.max_steps=4 checkpoint.resume=true 2>&1 \
        | grep -E '"(steps|steps_this_session|parallel|tokens_per_s|peak_memory_bytes|final_train_loss|final_eval_loss)"|^error|Error' \
        | tee -a "$RESULTS"
else
    section "pipeline 2-GPU smoke step skipped: $N_GPUS GPU(s) visible"
fi
