# README's two commands: `make demo` and `make test`. Each works from a fresh clone.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2
# DeepSpeed (a test dependency) installs without compiling its ops; tests never JIT-build them.
export DS_BUILD_OPS ?= 0
LINT_PATHS := $(wildcard moe kernels tests benchmarks examples)

.PHONY: venv test demo lint bench gpu clean

venv: $(VENV)/.installed

# --system-site-packages keeps an already installed (e.g. CUDA) torch; torch is installed only
# when the venv cannot import one, and before anything else so nothing pulls a CUDA build.
$(VENV)/.installed: setup.py requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	test -x $(PYTHON) || $(PY) -m venv --system-site-packages $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: venv
	$(PYTHON) -m pytest -q tests

demo: venv
	$(PYTHON) examples/quickstart.py

lint: venv
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)
	$(PYTHON) -m mypy moe

bench: venv
	$(PYTHON) benchmarks/balance.py

# On a GPU machine (CUDA torch + nvcc, no registry needed): build the CUDA extension, run the
# CUDA tests and the GPU benchmarks, most-wanted first under a deadline (GPU_DEADLINE_S);
# gpu.log and the CSVs go to GPU_OUT (default bench_out/gpu).
gpu:
	bash .ci/gpu.sh

clean:
	rm -rf $(VENV) build *.egg-info moe/_C*.so
