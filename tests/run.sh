#!/usr/bin/env bash
# The test command: create (or reuse) .venv, install megamoe with its dev extra, run pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k router`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(EXTRAS=dev bash tools/bootstrap_venv.sh)
exec "$PY" -m pytest -q "$@"
