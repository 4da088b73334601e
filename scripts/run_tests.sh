#!/usr/bin/env bash
# Runs pytest on the given paths. A run that executes no test must not pass as green: pytest's
# exit code 5 ("no tests collected") and a run where every test was skipped are failures here.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
.venv/bin/python -m pytest "$@" -ra --durations=40 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests in: $*" >&2
  rc=1
elif [ "$rc" -eq 0 ] && ! grep -qE "[0-9]+ passed.* in [0-9.]+s" "$log"; then
  # pytest's own summary line (other output, e.g. a library's threads at exit, may follow it)
  echo "run_tests: no test passed (all skipped or deselected) in: $*" >&2
  rc=1
fi
rm -f "$log"
exit "$rc"
