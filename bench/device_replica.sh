#!/usr/bin/env bash
# `make device-replica`: the GPU machine's image on this CPU machine, then the GPU check's dry run
# in it. The venv (.venv-replica, git-ignored) holds the image's packages at the image's versions
# and nothing else (no omegaconf, datasets, gguf, bitsandbytes or torchao: those come from the
# .whl bundle, installed by bench/gpu_check.sh the way it installs them on the device).
#
# Differences from the image that cannot be helped here, said where they matter (docs/gpu_check.md):
# - torch: the image has torch 2.11 built for CUDA. PyPI has no CPU build of 2.11 (its Linux wheel
#   is the CUDA one, 530 MB plus the CUDA libraries it needs to import), so the replica takes the
#   CPU build REPLICA_TORCH (the project's 2.13.0+cpu). `make device-replica
#   REPLICA_TORCH=torch==2.11.0` builds with the CUDA wheel instead (gigabytes, not for CI).
# - Python: the image has 3.12; the CPU torch wheel here is for this machine's python3 (3.11), so
#   REPLICA_PYTHON defaults to python3. Both knobs are make variables.
#
# Usage: bench/device_replica.sh [build|check|collect]   (default: build, then the full dry run)
#   build    only the venv (skipped when .venv-replica/.stamp is newer than this script)
#   collect  build + the dry run without the compile gate (imports, collection, arguments): CI
#   check    build + the full dry run (adds the compile gate's sm_90 subset under triton 3.6)
set -euo pipefail
cd "$(dirname "$0")/.."
REPLICA_PYTHON="${REPLICA_PYTHON:-python3}"
REPLICA_TORCH="${REPLICA_TORCH:-torch==2.13.0}"
REPLICA="${REPLICA:-.venv-replica}"
MODE="${1:-check}"
# The image's packages (docs/gpu_check.md), at its versions where known; their own dependencies
# come with them, as they did on the image.
IMAGE_PACKAGES=(
    triton==3.6.0 transformers==5.17.0 peft==0.21.0 accelerate==1.15.0 safetensors==0.8.0
    tokenizers huggingface_hub numpy pyarrow pandas xxhash pyyaml tqdm
    pytest pytest-xdist pytest-timeout
)
NOT_ON_THE_IMAGE=(omegaconf datasets dill multiprocess gguf bitsandbytes torchao)

build() {
    if [ -f "$REPLICA/.stamp" ] && [ "$REPLICA/.stamp" -nt "$0" ] \
        && [ "$(cat "$REPLICA/.stamp")" = "$REPLICA_PYTHON $REPLICA_TORCH" ]; then
        echo "device-replica: $REPLICA is up to date"
        return
    fi
    local began=$SECONDS
    rm -rf "$REPLICA"
    "$REPLICA_PYTHON" -m venv "$REPLICA"
    "$REPLICA/bin/python" -m pip install -q --upgrade pip
    "$REPLICA/bin/python" -m pip install -q "$REPLICA_TORCH" "${IMAGE_PACKAGES[@]}"
    # bytetune itself is not installed: on the device it runs from the tree (PYTHONPATH).
    local present=()
    for name in "${NOT_ON_THE_IMAGE[@]}"; do
        if "$REPLICA/bin/python" -m pip show -q "$name" >/dev/null 2>&1; then present+=("$name"); fi
    done
    if [ "${#present[@]}" -gt 0 ]; then
        echo "error: the replica pulled in ${present[*]}, which the image lacks; drop what brought it from IMAGE_PACKAGES" >&2
        exit 2
    fi
    echo "$REPLICA_PYTHON $REPLICA_TORCH" > "$REPLICA/.stamp"
    echo "device-replica: $REPLICA built in $((SECONDS - began)) s:" \
        "$("$REPLICA/bin/python" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")')"
}

build
[ "$MODE" = build ] && exit 0
if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "device-replica: no .whl/ yet, making the bundle (bench/gpu_bundle.sh)"
    bash bench/gpu_bundle.sh
fi
# The check's own install step, into the replica's folder (not .site, which is the device's).
dry=--dry-run
[ "$MODE" = collect ] && dry=--dry-run=collect
SITE="$PWD/$REPLICA/site" PYTHON="$PWD/$REPLICA/bin/python" PYTHONPATH="" bash bench/gpu_check.sh "$dry"
