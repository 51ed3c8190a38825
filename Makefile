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
	@touch $@

$(BUILD_STAMP): $(VENV_STAMP) setup.py CMakeLists.txt $(CSRC)
	$(VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

build: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

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
