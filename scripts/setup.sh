#!/usr/bin/env bash
# Install smt_dist and its test tools into the current Python environment.
#
# An installed torch is kept. Without one we install torch==2.13.0 first (set TORCH_SPEC to
# choose another): an unpinned torch would otherwise pull the newest CUDA build, several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PYTHON" -m pip install -e ".[test]"
