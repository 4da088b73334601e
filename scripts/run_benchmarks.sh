#!/usr/bin/env bash
# Runs every benchmark with the project's venv, from the repo root: `python -m benchmarks.<name>` for
# each benchmarks/<name>.py (not common.py, what they share, nor helpers, whose names start with '_'),
# and the GPU checks' benchmarks (benchmarks/gpu/: learner, paths, step_profile; at tiny shapes on a
# CPU; `make gpu-check` runs them at GPU shapes); not the soak (`make soak`: an hour under faults, not
# a timing). Stops on the first failure. Each benchmark prints its table and writes
# benchmarks/results/<name>.json (git-ignored); at the end one summary line per benchmark is printed
# from the "headline" of its JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
shopt -s nullglob
# "<result name> <module>" per benchmark, in the order of their result names.
entries=("gpu_learner gpu.learner" "gpu_paths gpu.paths" "gpu_profile gpu.step_profile")
for script in benchmarks/*.py; do
  name=$(basename "$script" .py)
  case "$name" in
    _* | common) continue ;;
  esac
  entries+=("$name $name")
done
mapfile -t entries < <(printf '%s\n' "${entries[@]}" | sort)
names=() modules=()
for entry in "${entries[@]}"; do
  names+=("${entry%% *}")
  modules+=("${entry#* }")
done
if [ "${#names[@]}" -eq 3 ]; then
  echo "run_benchmarks: no benchmarks/*.py found" >&2
  exit 1
fi
start=$SECONDS
declare -a durations=()
for module in "${modules[@]}"; do
  echo "=== benchmarks.$module"
  t0=$SECONDS
  "$PY" -m "benchmarks.$module"
  durations+=("$((SECONDS - t0))")
done

echo
echo "=== summary ($(nproc) CPUs, $((SECONDS - start))s in all)"
for i in "${!names[@]}"; do
  name=${names[$i]}
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
