#!/usr/bin/env bash
# Create .venv and install rlxf into it, with the torch build that fits the machine:
#   - an NVIDIA GPU (nvidia-smi lists one): the regular CUDA build;
#   - no GPU: the CPU build (about 200 MB instead of several GB of CUDA libraries).
# Override with TORCH_SPEC / TORCH_INDEX, e.g. TORCH_SPEC='torch==2.13.0' TORCH_INDEX='' for a custom mirror.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CPU_TORCH_INDEX="https://download.pytorch.org/whl/cpu"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing the CUDA build of torch"
    $PIP install "${TORCH_SPEC:-torch>=2.4}"
  else
    echo "[setup] no GPU: installing the CPU build of torch"
    # The CPU index carries `torch==X+cpu`, which pip ranks above the CUDA `torch==X` of the main index. Only torch
    # itself comes from there (--no-deps); a machine that has the CPU wheel locally (find-links) uses it and only
    # warns about an unreachable index. The second call installs torch's own dependencies from the usual index.
    $PIP install --no-deps "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX-"--extra-index-url=$CPU_TORCH_INDEX"}
    $PIP install "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi
echo "[setup] installing rlxf and its dependencies"
$PIP install -e ".[dev]"
"$VENV/bin/python" -c "import torch, rlxf; print(f'[setup] ok: rlxf {rlxf.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
