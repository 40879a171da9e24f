#!/usr/bin/env bash
# The test command: lint, then every test tier (unit, 2-rank distributed, real launchers).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
"$PYTHON" -m pytest "$@"
