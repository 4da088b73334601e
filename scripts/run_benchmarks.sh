#!/usr/bin/env bash
# Runs every benchmarks/*.py (files starting with '_' are helpers, skipped) with the project's venv,
# from the repo root; stops on the first failure. Each benchmark prints its table and writes
# benchmarks/results/<name>.json (git-ignored); at the end one summary line per benchmark is
# printed from the "headline" of its JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
shopt -s nullglob
# Helpers that another benchmark runs (with its own arguments) are not benchmarks: they are _*.py.
scripts=()
for script in benchmarks/*.py; do
  base=$(basename "$script")
  case "$base" in
    _*) continue ;;
    gpu_check.py) continue ;;  # `make gpu-check`: runs gpu_learner and gpu_paths at GPU shapes (tiny on the CPU)
    soak.py) continue ;;  # `make soak`: an hour under faults, not a timing
  esac
  scripts+=("$script")
done
if [ "${#scripts[@]}" -eq 0 ]; then
  echo "run_benchmarks: no benchmarks/*.py found" >&2
  exit 1
fi
start=$SECONDS
declare -a durations=()
for script in "${scripts[@]}"; do
  echo "=== $script"
  t0=$SECONDS
  "$PY" "$script"
  durations+=("$((SECONDS - t0))")
done

echo
echo "=== summary ($(nproc) CPUs, $((SECONDS - start))s in all)"
for i in "${!scripts[@]}"; do
  name=$(basename "${scripts[$i]}" .py)
  "$PY" - "$name" "benchmarks/results/$name.json" "${durations[$i]}" <<'EOF'
import json, sys
name, path, seconds = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    h = json.load(open(path))["headline"]
except (OSError, ValueError, KeyError) as exc:
    print(f"{name:<22} {seconds:>4}s  (no headline in {path}: {exc!r})")
    sys.exit(0)
value = h.get("value")
shown = f"{value:.3f}" if isinstance(value, (int, float)) else str(value)
met = {True: "met", False: "NOT met", None: "-"}[h.get("met")]
print(f"{name:<22} {seconds:>4}s  {h.get('name')}: {shown} {h.get('unit') or ''} (target {h.get('target')}: {met})")
EOF
done
