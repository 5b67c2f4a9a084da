# Two entry points (README): `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs; torch is pinned to the local CPU build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# Real models and data: ../shared/assets when it exists (override with TETHER_ASSETS=DIR).
TETHER_ASSETS ?= $(shell [ -d ../shared/assets ] && cd ../shared/assets && pwd)
export TETHER_ASSETS
DEMO_ARGS ?= --quick
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench clean venv

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/tether demo $(DEMO_ARGS) --output_dir outputs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.bench
	$(PY) benchmarks/bench_dpo.py
	$(PY) benchmarks/bench_online.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
