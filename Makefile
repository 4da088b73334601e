# Every target sets up first (scripts/setup.sh is idempotent and quick when nothing is missing).
PY := .venv/bin/python
CONFIG ?= configs/demo.yaml

.PHONY: setup run test lint test-slow test-all test-unit test-integration test-avx2 bench soak gpu-check clean

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/rlhf-cluster train $(CONFIG) --overwrite

# The suite CI runs (.ci/run): everything but the long learning runs marked `slow`.
test: setup
	@bash scripts/run_tests.sh tests -m "not slow" --timeout 600

# Lint, format and type checks of the library, the actors and the benchmarks (ruff and mypy, configured
# in pyproject.toml); `ruff format rlhf_cluster actors benchmarks` and `ruff check --fix rlhf_cluster actors
# benchmarks` repair most ruff findings. mypy takes ~2 min on 2 cores without its cache (.mypy_cache), seconds with it.
lint: setup
	.venv/bin/ruff check rlhf_cluster actors benchmarks
	.venv/bin/ruff format --check rlhf_cluster actors benchmarks
	.venv/bin/mypy

# The long learning runs (the demo and the tool demo to their margins, SFT and the reward model to their
# accuracies) and the job tests whose code paths `make test` covers in another job or a unit test
# (five presets, synchronous staleness, single-turn resume, the PPO job's resume, rollbacks used up,
# the int8-only pool, FSDP2's checkpoint round trip, the 0.5B and 70B recipes on raylets, the judge pool's
# scaling, a hung learner rank 1 under direct delivery); `make test-all` runs both.
test-slow: setup
	@bash scripts/run_tests.sh tests -m slow

test-all: setup
	@bash scripts/run_tests.sh tests

test-unit: setup
	@bash scripts/run_tests.sh tests/unit

test-integration: setup
	@bash scripts/run_tests.sh tests/integration -m "not slow"

# The learning tests again, with PyTorch dispatching as an AVX2-only CPU (CI's kind): a recipe that
# learns only on some CPUs' kernels fails here on any x86 machine (issue 39).
test-avx2: setup
	@ATEN_CPU_CAPABILITY=avx2 bash scripts/run_tests.sh tests -m learning

bench: setup
	@bash scripts/run_benchmarks.sh

# An hour of chaos (benchmarks/soak/): the demo's job on two raylets, its generation and reward pools
# autoscaled and a warm generation spare, under a seeded schedule of faults, then every invariant
# checked and the pools' sizes over time; SOAK_SEED replays a schedule, SOAK_MINUTES shortens it,
# SOAK_FLAGS adds options (`--no-autoscale --spares 0`: the job as it was before issue 73).
SOAK_MINUTES ?= 60
SOAK_SEED ?= 0
SOAK_FLAGS ?=
soak: setup
	$(PY) -m benchmarks.soak --minutes $(SOAK_MINUTES) --seed $(SOAK_SEED) $(SOAK_FLAGS)

# On a lent GPU machine (no package index, no setup: ../shared/GPU.md names the wheels to bring in
# .whl/): tests/gpu, the learner at 0.5B and 1.5B, the reference forward and the host hop, in one
# call of at most 8 minutes; one JSON (benchmarks/results/gpu_check/) and a table. Without a GPU the
# same steps run at tiny shapes on the CPU with .venv (make setup first).
gpu-check:
	@bash scripts/gpu_check.sh $(WHEEL_DIR)

clean:
	rm -rf runs .pytest_cache
