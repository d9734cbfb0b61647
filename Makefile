# The two commands of README.rst: `make demo` and `make test`.
# Each bootstraps its own isolated virtual environment in .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xaind-installed
PYTEST_ARGS ?=
# Test worker processes (pytest-xdist): most tests wait on real daemons rather
# than compute, so twice the CPUs keeps the cores busy. 0 runs the suite in
# this one process (e.g. with a debugger). Idle workers take queued tests
# from busy ones (worksteal), so one slow test does not hold the others back.
TEST_WORKERS ?= $(shell expr 2 \* $$(nproc 2>/dev/null || echo 1))
DEMO_ARGS ?=
BENCH_ARGS ?=
SOAK_ARGS ?=
# make bench QUICK=1: a subset in about two minutes (see bench/run.py).
QUICK ?=

.PHONY: all venv test demo scale-demo bench soak deb deb-test fuzz clean strategies-example

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
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(if $(filter-out 0,$(TEST_WORKERS)),--dist worksteal) $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m xaind.tools.demo $(DEMO_ARGS)

# A training past one machine, on loopback (xaind/tools/scale_demo.py): two
# coordinators sharing their state in Redis, three aggregator shards, the
# model served from SeaweedFS, one shard and one coordinator SIGKILLed, the
# final model checked against one machine's. Debian's redis-server is
# installed for the run if missing (as root) and purged after it.
SCALE_DEMO_ARGS ?=

scale-demo: $(STAMP)
	scripts/with-debian-packages redis-server -- $(BIN)/python -m xaind.tools.scale_demo $(SCALE_DEMO_ARGS)

# schemathesis against both real daemons with docs/openapi/ (scripts/fuzz),
# bounded in time: fails on a 5xx, an answer not as described, a daemon that
# died or logged a traceback. schemathesis comes from the `fuzz` extra.
FUZZ_STAMP := $(VENV)/.xaind-fuzz-installed
FUZZ_ARGS ?=

$(FUZZ_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-build-isolation -e '.[test,fuzz]' --config-settings editable_mode=compat
	touch $@

fuzz: $(FUZZ_STAMP)
	$(BIN)/python scripts/fuzz $(FUZZ_ARGS)

# Benchmarks of the real daemons on loopback; results in bench/results/<date>.jsonl.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(if $(filter-out 0,$(QUICK)),--quick) $(BENCH_ARGS)

# The house-prices example under attack: one training per aggregation strategy on both
# real daemons, the global model's R² per round charted (examples/house_prices/README.rst).
STRATEGIES_EXAMPLE_ARGS ?=

strategies-example: $(STAMP)
	$(BIN)/python examples/house_prices/house_prices.py compare-strategies \
		--data-directory build/house-prices --output build/house-prices/strategies.png $(STRATEGIES_EXAMPLE_ARGS)

# A long training with dropouts, restarts and garbage uploads over HTTP and PB;
# fails when a daemon's RSS or descriptors grow (bench/soak.py, 3-5 minutes).
# Not part of make test. make soak SOAK_ARGS=--quick: 30 rounds.
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# The Debian package, built by dpkg-buildpackage from a copy of the tree (the
# files git tracks or would track: no .venv, no caches) under build/deb, with
# Debian's tools and Python only (a plain PATH, no virtual environment).
# DEB_BUILD_OPTIONS passes through, e.g. make deb DEB_BUILD_OPTIONS=nocheck.
# The package and its .buildinfo and .changes end up in dist/.
DEB_VERSION = $(shell dpkg-parsechangelog -l debian/changelog -S Version)
DEB_SOURCE = build/deb/xaind-$(DEB_VERSION)
DEB_ENV = env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$$HOME" LC_ALL=C.UTF-8 \
	DEB_BUILD_OPTIONS="$(DEB_BUILD_OPTIONS)" DEB_BUILD_PROFILES="$(DEB_BUILD_PROFILES)"

deb:
	rm -rf build/deb
	mkdir -p $(DEB_SOURCE) dist
	git ls-files -z --cached --others --exclude-standard \
		| tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(DEB_SOURCE)
	cd $(DEB_SOURCE) && $(DEB_ENV) dpkg-buildpackage -us -uc -b
	cp build/deb/xaind_$(DEB_VERSION)_all.deb build/deb/xaind_$(DEB_VERSION)_*.buildinfo \
		build/deb/xaind_$(DEB_VERSION)_*.changes dist/
	@echo "Debian package: $(CURDIR)/dist/xaind_$(DEB_VERSION)_all.deb"

# The package as an operator meets it: build dependencies, build (tests
# included), lintian, install, both daemons run from the installed units as
# user xain, purge; every package it installed is purged again (root only).
deb-test:
	scripts/deb-test

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
