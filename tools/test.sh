#!/usr/bin/env bash
# The README's test command: install the package with its test extras and run the suite (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A bare torch requirement would pull a multi-GB CUDA build; take the pinned CPU wheel first.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
exec $PY -m pytest -q "$@"
