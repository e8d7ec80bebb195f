#!/usr/bin/env bash
# Install, start the router and two pipeline stages on the built-in demo model, stream a
# first answer, then keep serving on 127.0.0.1:50051 until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec stageserve up --pp 2 --prompt "Once upon a time" --max-new-tokens 32 "$@"
