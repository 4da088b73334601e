"""The project's benchmarks: each module here measures one thing the project claims (a speed beside
a baseline, a learning result over seeds) and writes `benchmarks/results/<name>.json` with a
`headline` (benchmarks/README.md has every run and its figures).

Run from the repository's root, as modules: `python -m benchmarks.<name>` (`make bench` runs every
benchmark here, scripts/run_benchmarks.sh); `python -m benchmarks.soak` is the hour under faults
(`make soak`), `python -m benchmarks.gpu.check` the GPU checks (`make gpu-check`).

- `common.py`: what the benchmarks share (machine info, tables, the result file, random models);
  `_timing.py`: sides in rotated order and their medians; `_jobs.py`: a local Ray instance and a
  job run quietly; `_learning.py`: what the learning benchmarks share (their parser, the overrides
  they put on a shipped job config, the loop over seeds and sides, the held-out figures, whether a
  side beats its control, the result file);
- `soak/`, `gpu/`: packages of their own;
- modules whose names start with `_` are helpers, not benchmarks: `_trl_side.py` runs as a
  script in TRL's own virtual environment (it imports nothing of this repository),
  `_rm_recipe_sweep.py` screens reward-model recipes.

What they may import: the library (`rlhf_cluster`), the actors (`actors`), each other as
`benchmarks.<module>`; nothing in `rlhf_cluster/`, `actors/` or `tests/` imports them (a test may
import a benchmark's pure parts, as tests/unit/test_soak_schedule.py does the soak's schedule).
"""
