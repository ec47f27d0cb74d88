#!/usr/bin/env bash
# The test command: create (or reuse) a virtual environment, install megamoe with its dev
# extra, and run pytest. Extra arguments go to pytest (e.g. `bash tests/run.sh -k state`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEGAMOE_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# torch goes in first and pinned: left to the resolver, an unpinned torch is a multi-GB CUDA
# build. 2.13.0 is the CPU wheel this machine carries; any installed torch >= 2.11 is kept.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev]"
exec "$PY" -m pytest -q "$@"
