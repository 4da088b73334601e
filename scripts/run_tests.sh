#!/usr/bin/env bash
# Runs pytest on the given paths. pytest's exit code 5 ("no tests collected") is a failure here:
# a suite that silently collects nothing must not pass as green.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@" -ra --durations=15
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests in: $*" >&2
  exit 1
fi
exit "$rc"
