# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv on first use
# and rebuilds it when setup.cfg changes.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch is installed first so that DeepSpeed's build sees it; override on machines with other wheels.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
ARGS ?=

# as an activated venv: its tools (ninja for DeepSpeed's JIT-built CPU ops, deepspeed) come first
export PATH := $(abspath $(VENV))/bin:$(PATH)
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export RAY_ACCEPT_CLUSTER_SCOPED_CONTEXT ?= 1

.PHONY: venv demo test test-fast test-faults bench gpu-check lint clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	$(VPY) -m pip install -q $(TORCH_SPEC)
	$(VPY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VPY) launch/demo.py $(ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q -m "not faults_heavy" $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow and not faults_heavy" $(PYTEST_ARGS)

test-faults: $(STAMP)
	$(VPY) -m pytest -q -m "faults or faults_heavy" $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

# The GPU path, measured where it runs (one line and exit 0 without CUDA): benchmarks/gpu_check.py
gpu-check: $(STAMP)
	$(VPY) benchmarks/gpu_check.py $(ARGS)

lint: $(STAMP)
	$(VPY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
