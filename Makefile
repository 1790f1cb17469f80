# kdfast: `make test` and `make bench` work on a fresh clone; each sets up what it needs first.
#   TORCH_SPEC   the torch to install (default: the CPU build 2.13.0; "torch" alone pulls a CUDA build)
#   VENV         where the virtual environment lives (default .venv)
#   PYTHON       the interpreter that creates it
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := numpy pytest hypothesis expecttest ninja pybind11 tabulate matplotlib rich psutil scikit-learn coverage
# Test-only: tests/integrations/test_trl.py compares kdfast's TRL drop-in with TRL's own function
# (trl pulls in transformers, accelerate, datasets, pandas, pyarrow: about 0.5 GB, under a minute).
# Installed by `make test`, not by the build; KDFAST_REQUIRE_TRL=1 makes a missing trl a failure.
TEST_DEPS := trl==1.16.0
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml kdfast/_version.py

.PHONY: setup build test-deps test test-slow bench bench-full clean

setup: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" $(DEPS)
	touch $@

build: $(VENV)/.build-stamp

$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-$$(nproc)} $(PIP) install -q --no-build-isolation -e .
	$(PY) -m kdfast
	touch $@

# The stamp holds TEST_DEPS, so that a changed pin installs again (and no rebuild follows).
test-deps: build  # (after the build: no two pip runs in one venv under make -j)
	@[ "$$(cat $(VENV)/.test-deps-stamp 2>/dev/null)" = "$(TEST_DEPS)" ] || \
	  { $(PIP) install -q $(TEST_DEPS) && echo "$(TEST_DEPS)" > $(VENV)/.test-deps-stamp; }

test: build test-deps
	KDFAST_REQUIRE_TRL=1 $(PY) -m pytest -q tests

test-slow: build test-deps
	KDFAST_SLOW=1 KDFAST_REQUIRE_TRL=1 $(PY) -m pytest -q tests

bench: build
	$(PY) -m bench

bench-full: build
	$(PY) -m bench --full

clean:
	rm -rf build *.egg-info kdfast/*.so $(VENV)/.build-stamp
