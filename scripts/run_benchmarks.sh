#!/usr/bin/env bash
# Runs every benchmarks/*.py with the project's venv, from the repo root; stops on the first failure.
# Each benchmark prints its table and writes benchmarks/results/<name>.json (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
scripts=(benchmarks/*.py)
if [ "${#scripts[@]}" -eq 0 ]; then
  echo "run_benchmarks: no benchmarks/*.py found" >&2
  exit 1
fi
for script in "${scripts[@]}"; do
  echo "=== $script"
  .venv/bin/python "$script"
done
