#!/usr/bin/env bash
# Creates .venv with everything the project needs (CPU only). Idempotent; safe to re-run.
# torch is pinned through constraints.txt: never let pip resolve an unpinned torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[torch,numba,triton,experiments,frameworks,test]"
# Graphviz renders the computation graph of `batchnorm explain`; optional, installed where apt works.
if ! command -v dot >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q graphviz >/dev/null 2>&1 || \
     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q graphviz >/dev/null 2>&1)) || \
      echo "setup: graphviz not installed; figures that need 'dot' will be skipped" >&2
  fi
fi
