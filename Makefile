# The two commands of README.rst: `make demo` and `make test`.
# Each bootstraps its own isolated virtual environment in .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xaind-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: all venv test demo clean

all: test

# A compat-mode editable install: a modern (import-hook) editable install hides
# twisted/plugins from twistd's plugin discovery.
$(STAMP): setup.py setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m xaind.tools.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
