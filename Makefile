# Every target sets up first (scripts/setup.sh is idempotent and quick when nothing is missing).
PY := .venv/bin/python
CONFIG ?= configs/demo.yaml

.PHONY: setup run test test-unit test-integration bench clean

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/rlhf-cluster train $(CONFIG) --overwrite

test: setup
	@bash scripts/run_tests.sh tests

test-unit: setup
	@bash scripts/run_tests.sh tests/unit

test-integration: setup
	@bash scripts/run_tests.sh tests/integration

bench: setup
	@bash scripts/run_benchmarks.sh

clean:
	rm -rf runs .pytest_cache
