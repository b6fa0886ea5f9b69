#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the whole suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -n 2 --dist loadgroup -q "$@"
