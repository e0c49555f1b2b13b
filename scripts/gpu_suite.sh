#!/usr/bin/env bash
# The test suite on a GPU machine whose python3 (or $PYTHON) already has torch (CUDA) and the libraries, e.g. a
# lent device with no network:   bash scripts/gpu_suite.sh [pytest args]
# Prints the versions it runs with; multi-process (gloo) tests are left out; tests whose optional package is missing
# (openai, trl) are skipped by pytest. Training there uses bf16 (`mixed_precision: auto`).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" - <<'PY'
import importlib

import torch

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, GPU: {gpu}")
for name in ("transformers", "accelerate", "datasets", "tokenizers", "openai", "trl", "xdist"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except ImportError:
        print(f"{name}: missing")
PY
workers=()
"$PY" -c "import xdist" 2>/dev/null && workers=(-n 8)
"$PY" -m pytest -q -p no:cacheprovider -m "not multiprocess" "${workers[@]}" "$@"
