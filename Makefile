# Every target sets up first (scripts/setup.sh is idempotent and quick when nothing is missing).
PY := .venv/bin/python
CONFIG ?= configs/demo.yaml

.PHONY: setup run test test-unit test-integration test-avx2 bench clean

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

# The learning tests again, with PyTorch dispatching as an AVX2-only CPU (CI's kind): a recipe that
# learns only on some CPUs' kernels fails here on any x86 machine (issue 39).
test-avx2: setup
	@ATEN_CPU_CAPABILITY=avx2 bash scripts/run_tests.sh tests -m learning

bench: setup
	@bash scripts/run_benchmarks.sh

clean:
	rm -rf runs .pytest_cache
