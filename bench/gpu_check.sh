#!/usr/bin/env bash
# GPU checks: the kernel tests compiled for real (TRITON_INTERPRET=0), then the benches at full
# size. Tables are tee'd to bench/results/gpu_<date>.txt. Budget: under 8 minutes in total.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT="bench/results/gpu_$(date +%F).txt"
mkdir -p bench/results
export TRITON_INTERPRET=0
echo "# gpu_check $(date -u +%FT%TZ) on $($PY -c 'import torch; print(torch.cuda.get_device_name())')" | tee -a "$OUT"

# ZeroQuant (issue 6): group-wise kernels and layer, then W8A8 / W4A8 / W4A16 GEMMs vs bf16 nn.Linear
# at the int8 issue's shapes (tokens 1/16/4096; 4096x4096, 4096x16384, 16384x4096).
timeout 150 $PY -m pytest -q tests/kernels/test_groupwise.py tests/quant_layers/test_group_linear.py 2>&1 | tail -5 | tee -a "$OUT"
timeout 150 $PY bench/group_gemm.py 2>&1 | tee -a "$OUT"
