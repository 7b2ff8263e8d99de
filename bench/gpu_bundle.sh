#!/usr/bin/env bash
# `make gpu-bundle`: the wheels bytetune needs that the GPU machine's image lacks, into the
# git-ignored .whl/ that travels with the tree (the device tool's `carry: [".whl"]`).
# bench/gpu_check.sh installs them there with `pip install --no-index --no-deps --target .site`.
# The image (Python 3.12, facts in docs/gpu_check.md) has torch, triton, transformers, peft,
# accelerate, safetensors, numpy, pyarrow, pandas, xxhash, pyyaml, tqdm, huggingface_hub, but no
# omegaconf, datasets (nor its dill and multiprocess), gguf, bitsandbytes or torchao.
# The whole tree may carry 64 MiB: the bundle keeps to BUNDLE_MAX_MIB (60), and a peer wheel that
# would push it over is left out with a line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DEST="${DEST:-.whl}"
BUNDLE_MAX_MIB="${BUNDLE_MAX_MIB:-60}"
# What bytetune imports (pinned to the versions this project's .venv resolves and tests). omegaconf
# 2.4 is a pure wheel needing only PyYAML; 2.3 needs antlr4-python3-runtime 4.9, an sdist.
REQUIRED=(omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 gguf==0.19.0)
# multiprocess ships one wheel per Python version: the image's 3.12, and 3.11 for the CPU replica
# (make device-replica) when it runs on this machine's python3.
MULTIPROCESS=multiprocess==0.70.19
PY_VERSIONS=(3.12 3.11)
# The peers of the benches' comparison rows, largest last: each only if it still fits.
PEERS=(torchao==0.18.0 bitsandbytes==0.50.2)

download() {  # download PYVER SPEC: one wheel for the image's platform, no dependencies
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$1" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 -d "$2" "$3"
}
size_mib() { du -sk "$1" | awk '{printf "%.1f", $1 / 1024}'; }

rm -rf "$DEST" && mkdir -p "$DEST"
for spec in "${REQUIRED[@]}"; do download 3.12 "$DEST" "$spec"; done
for pyver in "${PY_VERSIONS[@]}"; do download "$pyver" "$DEST" "$MULTIPROCESS"; done
for spec in "${PEERS[@]}"; do
    tmp=$(mktemp -d)
    download 3.12 "$tmp" "$spec"
    new_kib=$(( $(du -sk "$DEST" | cut -f1) + $(du -sk "$tmp" | cut -f1) ))
    if [ "$new_kib" -le $(( BUNDLE_MAX_MIB * 1024 )) ]; then
        mv "$tmp"/*.whl "$DEST"/
    else
        echo "gpu-bundle: $spec left out ($(size_mib "$tmp") MiB would take the bundle past $BUNDLE_MAX_MIB MiB):" \
             "its rows in the benches are skipped on the GPU machine"
    fi
    rm -rf "$tmp"
done
ls -1s --block-size=K "$DEST"
echo "gpu-bundle: $(ls "$DEST" | wc -l) wheels, $(size_mib "$DEST") MiB in $DEST/ (limit $BUNDLE_MAX_MIB MiB)"
