#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install megamoe into it; prints its python.
# Used by tests/run.sh and examples/quickstart.sh. MEGAMOE_VENV overrides the location (.venv);
# EXTRAS picks the pip extras (default: none).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEGAMOE_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >&2
PY="$VENV/bin/python"
# torch goes in first and pinned: left to the resolver, an unpinned torch is a multi-GB CUDA
# build. 2.13.0 is the CPU wheel this machine carries; any installed torch >= 2.11 is kept.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0" >&2
"$PY" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}" >&2
echo "$PY"
