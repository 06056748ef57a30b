# README's two commands: `make demo` and `make test`. Each works from a fresh clone.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
# torch and triton are installed first and stay out of the lock: a venv that can already import
# them (a CUDA torch from the system site-packages, with the triton it pins) keeps them.
TORCH_SPEC ?= torch==2.13.0
# The triton that torch 2.13.0's CUDA build pins; on CPU it serves the interpreter tests.
TRITON_SPEC ?= triton==3.7.1
# Exact versions of everything else `make venv` installs (make lock re-resolves it; LOCK= skips it).
LOCK ?= requirements-lock.txt
LATEST_VENV ?= .venv-latest
export OMP_NUM_THREADS ?= 2
# DeepSpeed (a test dependency) installs without compiling its ops; tests never JIT-build them.
export DS_BUILD_OPS ?= 0
LINT_PATHS := $(wildcard moe kernels tests benchmarks examples)

.PHONY: venv test demo lint lock test-latest bench gpu clean

venv: $(VENV)/.installed

# --system-site-packages keeps an already installed (e.g. CUDA) torch; torch is installed only
# when the venv cannot import one, and before anything else so nothing pulls a CUDA build.
$(VENV)/.installed: setup.py requirements-dev.txt $(LOCK) $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	test -x $(PYTHON) || $(PY) -m venv --system-site-packages $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) install -q $(TRITON_SPEC)
	$(PIP) install -q -r requirements-dev.txt $(if $(LOCK),-c $(LOCK))
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: venv
	MOE_LOCK=$(LOCK) $(PYTHON) -m pytest -q tests

demo: venv
	$(PYTHON) examples/quickstart.py

lint: venv
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)
	$(PYTHON) -m mypy moe

# Re-resolves requirements-lock.txt from requirements-dev.txt in a scratch venv that sees no
# system packages (so every package pulled is frozen), on top of TORCH_SPEC (CPU by default).
# torch, triton and CUDA-only packages (nvidia-*, cuda-*) are left out (see TORCH_SPEC above).
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q $(TORCH_SPEC)
	.venv-lock/bin/python -m pip install -q -r requirements-dev.txt
	{ echo "# Exact versions for \`make venv\` (a constraints file): written by \`make lock\`; do not edit."; \
	  echo "# Resolved from requirements-dev.txt on $$(date -u +%Y-%m-%d), CPython $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version(), platform.machine())'), with $(TORCH_SPEC)."; \
	  echo "# torch, triton, nvidia-* and cuda-* are not pinned here (see Makefile: TORCH_SPEC, TRITON_SPEC)."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -viE '^(pip|torch|triton|nvidia-[^=]*|cuda-[^=]*)==' | LC_ALL=C sort -f; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

# Drift check, not part of CI: a fresh venv with the newest release of every dependency (torch
# stays TORCH_SPEC or the installed one; triton is the newest on CPU, torch's pin with CUDA),
# then the test suite. Record the date, versions and result in README and BENCHMARKS.md.
# LATEST_EXTRA adds requirements, e.g. the oldest supported transformers:
#   make test-latest LATEST_VENV=.venv-tf457 LATEST_EXTRA='transformers==4.57.*'
LATEST_EXTRA ?=
test-latest:
	rm -rf $(LATEST_VENV)
	$(PY) -m venv --system-site-packages $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -c "import torch" 2>/dev/null || $(LATEST_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(LATEST_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(LATEST_VENV)/hold-torch.txt
	$(LATEST_VENV)/bin/python -m pip install -q -U --upgrade-strategy eager triton -r requirements-dev.txt \
	  $(LATEST_EXTRA) -c $(LATEST_VENV)/hold-torch.txt
	$(LATEST_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	$(LATEST_VENV)/bin/python -m pip list --format freeze > $(LATEST_VENV)/versions.txt
	@echo "test-latest: $$(grep -iE '^(torch|triton|transformers|kernels|huggingface.hub|tokenizers|deepspeed|numpy|safetensors|pytest)==' \
	  $(LATEST_VENV)/versions.txt | tr '\n' ' ')"
	$(LATEST_VENV)/bin/python -m pytest -q tests

bench: venv
	$(PYTHON) benchmarks/balance.py

# On a GPU machine (CUDA torch + nvcc, no registry needed): build the CUDA extension, run the
# CUDA tests and the GPU benchmarks, most-wanted first under a deadline (GPU_DEADLINE_S);
# gpu.log and the CSVs go to GPU_OUT (default bench_out/gpu).
gpu:
	bash .ci/gpu.sh

clean:
	rm -rf $(VENV) $(LATEST_VENV) .venv-lock build *.egg-info moe/_C*.so
