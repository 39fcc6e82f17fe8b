# moa-flex: set-up, main job and tests from a clean clone.
#   make demo      create .venv, install, run the main job (moa-flex demo, CPU, ~3 min)
#   make test      create .venv, install, run the test suite (CPU)
#   make test-slow the slow tests kept out of the default run
#   make support   the support matrix over every causal-LM type (writes docs/SUPPORT.md)
#   make bench-masks  block-mask build benchmark (append to bench/RESULTS.md)
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU take the local CPU build of torch; with one, the registry's CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.11" || echo "torch==2.13.0")

.PHONY: setup demo test test-slow support bench-masks clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/moa-flex demo -o moa-flex-demo

# Two workers (one per core of the CI machine), each running whole files so that a file's
# compiled models are built once, the longest files first (tests/conftest.py FILE_SECONDS); each
# worker takes one core: one OpenMP thread and inductor compiling in-process (its pool of
# compile processes would compete with the other worker).
# TORCHINDUCTOR_VEC_ISA_OK=1: inductor takes the vector instruction sets /proc/cpuinfo lists
# instead of test-compiling each one first (about 13 s of g++ per worker with cold caches).
TEST_WORKERS ?= 2
TEST_ENV ?= OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 TORCHINDUCTOR_VEC_ISA_OK=1

test: setup
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# one process: the slow set holds a timing bar (the 128K mask build) that needs both cores
test-slow: setup
	$(PY) -m pytest -q -m slow

support: setup
	$(PY) -m moa_flex.support

bench-masks: setup
	$(PY) bench/mask_build.py --record

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
