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
# The editable install (which also compiles megamoe/data/helpers.cpp) is redone only when what
# it depends on changed since the last one with these extras: code changes are live anyway.
STAMP="$VENV/.megamoe-installed-${EXTRAS:-none}"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] \
        || [ megamoe/data/helpers.cpp -nt "$STAMP" ] || ! "$PY" -c "import megamoe" 2>/dev/null; then
    "$PY" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}" >&2
    touch "$STAMP"
fi
echo "$PY"
