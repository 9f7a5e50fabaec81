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
# CI builds it. Where either cannot be installed, the tests are collected and skipped with the reason,
# except under CI (CI=true), where that is an error: there a skip would pass for a run.
# A real run at tiny parameters is made inside the test (or set MEDSSL_BROWSER_RUN=runs/<run>).
BROWSER_VENV ?= .venv-browser
BROWSER_SHOTS ?= runs/browser
CHROMIUM ?= /usr/bin/chromium
APT_GET ?= apt-get
BROWSER_MISSING = if [ "$(CI)" = true ] || [ "$(CI)" = 1 ]; then echo "browser-test: CI=true and $(1) could not be installed: failing (a skip would pass unseen)" >&2; exit 1; fi; \
	  echo "browser-test: $(1) could not be installed; the browser tests will be skipped"
browser-test: $(STAMP)
	@test -x $(CHROMIUM) || ($(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq chromium) \
	  || { $(call BROWSER_MISSING,chromium); }
	@test -x $(BROWSER_VENV)/bin/python || $(PYTHON) -m venv $(BROWSER_VENV) || true
	@$(BROWSER_VENV)/bin/python -m pip install --quiet playwright pytest \
	  || { $(call BROWSER_MISSING,playwright); }
	@mkdir -p $(BROWSER_SHOTS)
	@PY=$(BROWSER_VENV)/bin/python; $$PY -c "import pytest" 2>/dev/null || PY=$(BIN)/python; \
	  MEDSSL_BROWSER_TESTS=1 MEDSSL_CHROMIUM=$(CHROMIUM) MEDSSL_BROWSER_SCREENSHOTS=$(abspath $(BROWSER_SHOTS)) \
	  MEDSSL_PROJECT_PYTHON=$(abspath $(BIN))/python \
	  $$PY -m pytest -p no:cacheprovider --confcutdir tests/browser tests/browser -v -rs --durations=5

clean-runs:
	rm -rf runs/
