# medssl: `make demo` runs the main job, `make test` the test suite.
# Both create the virtualenv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medssl-installed

# glibc malloc tuning: ~2x for CPU training here (README, "Performance").
# Exported so papermill kernels and pytest workers inherit it.
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 100000000000
export MALLOC_TOP_PAD_ := 1000000000
export PYTHONUNBUFFERED := 1

RUN ?= demo
TEST_WORKERS ?= 2

.PHONY: venv test demo lab clean-runs help

help:
	@echo "make demo   - create the venv if needed, then run the demo pipeline into runs/$(RUN)/"
	@echo "make test   - create the venv if needed, then run the whole test suite"
	@echo "make lab    - start JupyterLab in the venv"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=15 tests

demo: $(STAMP)
	$(BIN)/medssl pipeline --plan demo --run $(RUN)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean-runs:
	rm -rf runs/
