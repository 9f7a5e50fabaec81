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
# UTF-8 I/O whatever the locale of the machine (CI may run with LANG=C)
export PYTHONUTF8 := 1

RUN ?= demo
TEST_WORKERS ?= 2

.PHONY: venv test demo lab tensorboard browser-test clean-runs help

help:
	@echo "make demo   - create the venv if needed, then run the demo pipeline into runs/$(RUN)/"
	@echo "make test   - create the venv if needed, then run the whole test suite"
	@echo "make lab    - start JupyterLab in the venv"
	@echo "make tensorboard RUN=demo - live training curves of every method of runs/\$$RUN (TensorBoard, port \$$TB_PORT)"
	@echo "make browser-test - the latent viewers in JupyterLab + headless Chromium (CI runs it too), screenshots to runs/browser/"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check medssl tests benchmarks
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --durations=15 tests

demo: $(STAMP)
	$(BIN)/medssl pipeline --plan demo --run $(RUN)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

# Training writes TensorBoard event files beside each method's metrics.jsonl (runs/<run>/<method>/),
# so every method of the run is one TensorBoard run; it refreshes while training goes on.
RUNS_DIR ?= $(shell $(BIN)/python -c "from medssl.paths import runs_dir; print(runs_dir())")
TB_PORT ?= 6006
tensorboard: $(STAMP)
	@test -d "$(RUNS_DIR)/$(RUN)" || { echo "tensorboard: no run folder $(RUNS_DIR)/$(RUN) (make tensorboard RUN=<run>)"; exit 1; }
	$(BIN)/tensorboard --logdir "$(RUNS_DIR)/$(RUN)" --port $(TB_PORT) --reload_interval 15

# Browser tests (CI runs them after `make test`, see .ci/run): Debian's chromium (apt-get, when it
# can be installed) and PyPI's playwright in a separate venv, so the project environment stays as
# CI builds it. Where either cannot be installed, the tests are collected and skipped with the reason.
# A real run at tiny parameters is made inside the test (or set MEDSSL_BROWSER_RUN=runs/<run>).
BROWSER_VENV ?= .venv-browser
BROWSER_SHOTS ?= runs/browser
browser-test: $(STAMP)
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  || echo "browser-test: chromium could not be installed; the browser tests will be skipped"
	@test -x $(BROWSER_VENV)/bin/python || $(PYTHON) -m venv $(BROWSER_VENV) || true
	@$(BROWSER_VENV)/bin/python -m pip install --quiet playwright pytest \
	  || echo "browser-test: playwright could not be installed; the browser tests will be skipped"
	@mkdir -p $(BROWSER_SHOTS)
	@PY=$(BROWSER_VENV)/bin/python; $$PY -c "import pytest" 2>/dev/null || PY=$(BIN)/python; \
	  MEDSSL_BROWSER_TESTS=1 MEDSSL_BROWSER_SCREENSHOTS=$(abspath $(BROWSER_SHOTS)) MEDSSL_PROJECT_PYTHON=$(abspath $(BIN))/python \
	  $$PY -m pytest -p no:cacheprovider --confcutdir tests/browser tests/browser -v -rs --durations=5

clean-runs:
	rm -rf runs/
