# Quick start: `make run` (main job) and `make test` (test suite). Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install run test test-all test-fast lint bench clean

# Re-installs only when pyproject.toml changes; safe to re-run.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[full,dev,test]'
	@touch $(STAMP)

install: $(STAMP)

# The main job: LeNet-5 on the embedded handwritten digits, offline.
run: $(STAMP)
	$(VENV)/bin/cnn-jax train lenet5_digits

# The whole suite, slow tests included, on 8 forced CPU devices so multi-device code is exercised.
test: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $(XLA_FLAGS)" $(PY) -m pytest -n 2 --dist loadfile -q -m "not heavy"

# Everything, the heavy tests too (about 6 minutes more on 2 cores).
test-all: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $(XLA_FLAGS)" $(PY) -m pytest -n 2 --dist loadfile -q

test-fast: $(STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $(XLA_FLAGS)" $(PY) -m pytest -n 2 --dist loadfile -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check cnn_jax tests experiments benchmarks

bench: $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
