#!/usr/bin/env bash
# Installs stageserve (editable) and its dependencies into the current Python.
# CPU machines take torch from the local CPU wheel (torch==2.13.0); a machine that already
# has torch (the GPU hosts) keeps its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test]"
