#!/usr/bin/env bash
# GPU check: on a CUDA machine, run the kernel tests compiled (no interpreter), then the benches,
# and tee their tables to bench/results/gpu_<date>.txt. Budget: under 8 minutes in total.
# Later issues append their own sections below.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT="bench/results/gpu_$(date +%F).txt"
mkdir -p bench/results
export TRITON_INTERPRET=0
{
  echo "# bytetune GPU check $(date -u +%FT%TZ) on $($PY -c 'import torch; print(torch.cuda.get_device_name())')"

  echo "## issue 2: block-wise quantization and fused 8-bit optimizer kernels (includes ~1e6 sizes on GPU)"
  timeout 180 $PY -m pytest -q tests/kernels/test_blockwise.py tests/kernels/test_optim_update.py 2>&1 | tail -n 5
  echo "## issue 2: optimizer step time, state bytes, GB/s vs device copy"
  timeout 150 $PY bench/optim_step.py 2>&1
  echo "## issue 2: quantization error, dynamic vs linear 8-bit"
  timeout 60 $PY bench/quant_error.py 2>&1
} | tee -a "$OUT"
