#!/usr/bin/env bash
# The test command: lint, then the tests every run checks (unit, 2-rank distributed, one case of
# each launcher, engine and bad-input kind; 25 minutes on a fresh clone with 2 cores).
#   bash scripts/test.sh --all      the whole matrix too (tests marked slow; about 50-75 minutes)
#   bash scripts/test.sh -m "not e2e and not multiprocess"   the fast loop (seconds)
# Further arguments go to pytest; a -m of your own replaces the tier's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TIER=(-m "not slow")
if [[ "${1:-}" == "--all" ]]; then
    TIER=()
    shift
fi
"$PYTHON" -m ruff check .
"$PYTHON" -m ruff format --check .
# --durations: where the time went, printed at the end of every run (CI's log included)
"$PYTHON" -m pytest --durations=25 "${TIER[@]}" "$@"
