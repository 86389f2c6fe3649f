# Quickstart: `make train` and `make test`. Both set up .venv first.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
SHARED_DATA := $(wildcard ../shared/data/names.txt)

# Point the product at the local mirror of names.txt when it is beside the checkout.
ifneq ($(SHARED_DATA),)
export BACKPROP_NINJA_DATA ?= $(abspath ../shared/data)
endif

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

# Torch is installed on its own first, at TORCH_SPEC, so that the package's `torch>=2.10`
# is already satisfied and pip never resolves a newer build with its CUDA packages.
# The C sources are prerequisites: a changed one is rebuilt (setup.py's optional extensions).
C_SOURCES   := $(wildcard src/backprop_ninja/*/*.c src/backprop_ninja/*/*.h)

$(VENV)/.installed: pyproject.toml setup.py $(C_SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,notebook]"
	touch $@

train: setup
	$(BIN)/backprop-ninja train --plots

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/backprop-ninja bench

clean:
	rm -rf $(VENV) runs .pytest_cache
