# aim-ds: `make demo` shows the whole pipeline; `make test` runs the test suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: setup test test-fast fuzz lint bench bench-gpu wheels demo study clean

setup:
	@bash scripts/setup.sh

# The whole pipeline on real images (sklearn digits): data_prep -> DeepSpeed ZeRO-3 -> probes.
DEMO_ARGS ?=
demo: setup
	$(PY) run/demo.py --out demo_out $(DEMO_ARGS)

# The paper's two findings at small scale (run/study.py, aim_ds/study.py): digits betons, aim-nano /
# aim-test / aim-tiny pretrained for the same 600 steps on 2 CPU ranks (aim-tiny: a checkpoint and val loss
# every 60 steps, all kept), every aim-tiny checkpoint probed (heads on 10 labelled digits per class,
# 3 probe seeds), then the sizes (how long it takes: BENCHMARKS.md, "The study"). Figures in study_out/study/.
STUDY_ARGS ?= --steps 600 --every 60 --probe-seeds 3
study: setup
	$(PY) run/study.py --out study_out --pretrain $(STUDY_ARGS)

test: setup
	$(PY) -m pytest tests -q -ra --durations=25

test-fast: setup
	$(PY) -m pytest tests -q -ra -m "not deepspeed"

# Property fuzzing of every reader of a user's file, longer than make test's 40 examples per reader.
FUZZ_EXAMPLES ?= 500
fuzz: setup
	AIM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz_files.py tests/test_fuzz_beton.py -q

lint: setup
	$(VENV)/bin/ruff check aim_ds data_prep run tests bench

bench: setup
	$(PY) bench/bench_loader.py --out bench_out/loader.md

# Training-step benchmark, ZeRO-3 against plain PyTorch (GPU; on CPU it runs the test model).
BENCH_GPU_MODELS ?= aim-0.6B aim-1B
BENCH_GPU_ARGS ?= --micro-batch 64
bench-gpu: setup
	$(PY) bench/bench_gpu.py --models $(BENCH_GPU_MODELS) $(BENCH_GPU_ARGS) --out bench_out/gpu.md

# Wheels for an offline GPU machine: DeepSpeed is an sdist on PyPI; its pure-Python wheel builds here.
wheels: setup
	$(PY) -m pip wheel -q --no-deps -w wheels deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack einops safetensors
	@ls wheels

clean:
	rm -rf bench_out demo_out study_out .pytest_cache
