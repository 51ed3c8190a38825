# The two commands of the contract: `make train` and `make test`. Both bootstrap .venv.
# torch is installed (CPU build 2.13.0 from local disk) only where no torch is importable;
# the venv sees the system site-packages so a machine's preinstalled torch/triton are used.
PY ?= .venv/bin/python
VENV := .venv
VENV_STAMP := $(VENV)/.bootstrapped
BUILD_STAMP := $(VENV)/.built
DEPS := triton pybind11 ninja pytest pytest_benchmark numpy
# optional: a machine without network and without them (the GPU machine) skips the tests that
# need them (the property tests; the HF Trainer tests, which CI must run: tests/test_hf.py)
OPTIONAL_DEPS := hypothesis transformers accelerate
# `make test` runs the test files in JOBS processes (pytest-xdist, one file per process at a
# time so module fixtures are built once; one torch/OpenMP thread each: an idle second thread
# only spins) where pytest-xdist is installed, else in one process. JOBS=1: one process.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
CSRC := $(shell find csrc -type f 2>/dev/null)
OUT ?=

.PHONY: test train bench gpu-check build clean

$(VENV_STAMP): Makefile
	@test -x $(VENV)/bin/python || python3 -m venv --system-site-packages $(VENV)
	@$(VENV)/bin/python -c "import torch" 2>/dev/null || \
	  $(VENV)/bin/python -m pip install -q torch==2.13.0
	@for mod in $(DEPS); do \
	  $(VENV)/bin/python -c "import $$mod" 2>/dev/null || \
	  $(VENV)/bin/python -m pip install -q $$(echo $$mod | tr _ -) || exit 1; \
	done
	@for mod in $(OPTIONAL_DEPS); do \
	  $(VENV)/bin/python -c "import $$mod" 2>/dev/null || \
	  $(VENV)/bin/python -m pip install -q $$mod || \
	  echo "$$mod unavailable: the tests that need it are skipped"; \
	done
	@$(VENV)/bin/python -c "import xdist" 2>/dev/null || \
	  $(VENV)/bin/python -m pip install -q pytest-xdist || \
	  echo "pytest-xdist unavailable: make test runs in one process"
	@touch $@

$(BUILD_STAMP): $(VENV_STAMP) setup.py CMakeLists.txt $(CSRC)
	$(VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

build: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	@if [ "$(JOBS)" -gt 1 ] && $(PY) -c "import xdist" 2>/dev/null; then \
	  echo "OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist loadfile tests"; \
	  OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist loadfile tests; \
	else \
	  echo "$(PY) -m pytest -q tests"; $(PY) -m pytest -q tests; \
	fi

train: $(BUILD_STAMP)
	$(PY) -m lowrank_fused.train

bench: $(BUILD_STAMP)
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -r bench/requirements.txt \
	  || echo "matplotlib unavailable: plots skipped"
	$(PY) -m bench.run $(if $(OUT),--out $(OUT),)

# The first device command (at most 8 minutes on a bare GPU machine, the build included): the
# build, the hot kernels' CUDA tests and the headline benchmarks (bench/gpu_check.py); the
# budget clock starts here (GPU_CHECK_T0). pip gets no retries: the GPU machine has no network.
# GPU_CHECK_ARGS="--full [--skip-tests | --skip-bench | --suite ...]" is the whole suite and
# every benchmark instead, split over further device commands of at most 10 minutes each.
# A failed build still runs the script (the Triton kernels need no build; the CUDA tests then
# fail and say why) and the target fails with the build's status.
gpu-check:
	@t0=$$(date +%s); PIP_RETRIES=0 PIP_TIMEOUT=5 $(MAKE) --no-print-directory build; b=$$?; \
	  GPU_CHECK_T0=$$t0 $(PY) -m bench.gpu_check $(if $(OUT),--out $(OUT),) $(GPU_CHECK_ARGS); \
	  r=$$?; if [ $$b -ne 0 ]; then echo "gpu-check: the build failed (exit $$b)"; exit $$b; fi; \
	  exit $$r

clean:
	rm -rf build *.egg-info lowrank_fused/*.so $(BUILD_STAMP)
