# shardswitch: `make run` starts the switch, `make test` runs every test (real QEMU guests included).
# Both install what they need on a fresh Debian 12 machine (Debian packages via scripts/install-deps.sh,
# Python packages into .venv).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
WORKERS ?= 2

.PHONY: run test unit typecheck bench fuzz demo deps deps-runtime clean

deps-runtime:
	@scripts/install-deps.sh --runtime

deps:
	@scripts/install-deps.sh
	@scripts/install-qemu10.sh

$(STAMP): pyproject.toml setup.py shardswitch/virtio/_vring.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

run: deps-runtime $(STAMP)
	$(VENV)/bin/shardswitch start $(ARGS)

typecheck: $(STAMP)
	$(PY) -m mypy

unit: $(STAMP)
	$(PY) -m pytest -q -m 'not guest and not dpdk' tests

# The data path twice: on the compiled ring helper (the whole suite), then on its Python reference
# (SHARDSWITCH_RING=python: the ring, worker and real-guest TCP tests; the differential test needs both).
REFERENCE_TESTS ?= tests/virtio tests/worker tests/guest/test_guest_tcp.py tests/guest/test_guest_migration.py

test: deps $(STAMP) typecheck
	$(PY) -m pytest -q -rs tests
	SHARDSWITCH_RING=python $(PY) -m pytest -q -rs --ignore=tests/virtio/test_virtio_fastring.py $(REFERENCE_TESTS)

$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

bench: deps $(STAMP) $(VENV)/.bench
	$(PY) -m bench.run

# Longer fuzzing than CI's 10,000 inputs per interface (FUZZ_EXAMPLES to change it).
FUZZ_EXAMPLES ?= 200000
fuzz: $(STAMP)
	SHARDSWITCH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -m 'not guest and not dpdk' -k fuzz tests

demo: deps $(STAMP)
	$(PY) -m tests.guest.demo --workers $(WORKERS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache
