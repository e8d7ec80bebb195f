#!/usr/bin/env bash
# The test command: install, then run the whole suite (GPU tests skip themselves without CUDA).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k block_manager`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest "$@"
