# aim-ds: `make demo` shows the whole pipeline; `make test` runs the test suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: setup test test-fast lint bench demo clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests -q -ra

test-fast: setup
	$(PY) -m pytest tests -q -ra -m "not deepspeed"

lint: setup
	$(VENV)/bin/ruff check aim_ds data_prep run tests bench

bench: setup
	$(PY) bench/bench_loader.py --out bench_out/loader.md

clean:
	rm -rf bench_out demo_out .pytest_cache
