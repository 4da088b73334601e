#!/usr/bin/env bash
# `make gpu-check`: one call on a GPU machine with torch and transformers but no package index
# (../shared/GPU.md). Installs the project's missing dependencies from a local wheel folder
# (WHEEL_DIR, the first argument, or .whl/) into /tmp/rlhf-site when one is there, then runs
# `python -m benchmarks.gpu.check`, which writes benchmarks/results/gpu_check/gpu_check.json and a table.
# Without a GPU it runs the same steps at tiny shapes on the CPU, with the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_DIR=${WHEEL_DIR:-${1:-.whl}}
[ $# -gt 0 ] && shift
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  PY=.venv/bin/python
fi
if [ -d "$WHEEL_DIR" ] && ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
  echo "[gpu-check] installing the wheels in $WHEEL_DIR into /tmp/rlhf-site (no index)"
  wheels=("$WHEEL_DIR"/*.whl)
  # torchvision (the VLM processors need it) only where the machine has none: never shadow a working one.
  if "$PY" -c "import torchvision" >/dev/null 2>&1; then
    wheels=("${wheels[@]/*torchvision-*/}")
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/rlhf-site ${wheels[@]}
  for sdist in "$WHEEL_DIR"/deepspeed-*.tar.gz; do
    [ -e "$sdist" ] || continue
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/rlhf-site "$sdist"
  done
  export PYTHONPATH=/tmp/rlhf-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu.check "$@"
