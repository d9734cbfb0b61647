# The two commands of README.rst: `make demo` and `make test`.
# Each bootstraps its own isolated virtual environment in .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xaind-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
# make bench QUICK=1: a subset in about two minutes (see bench/run.py).
QUICK ?=

.PHONY: all venv test demo bench clean

all: test

# A compat-mode editable install: a modern (import-hook) editable install hides
# twisted/plugins from twistd's plugin discovery. setuptools has deprecated the
# compat mode, so it is pinned to the releases known to keep it, and the
# build uses the venv's setuptools (no build isolation).
$(STAMP): setup.py setup.cfg Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 'setuptools>=64,<85' wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m xaind.tools.demo $(DEMO_ARGS)

# Benchmarks of the real daemons on loopback; results in bench/results/<date>.jsonl.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(if $(filter-out 0,$(QUICK)),--quick) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
