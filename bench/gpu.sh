#!/usr/bin/env bash
# The GPU bench in one command, for the day an accelerator is lent (<= 10 minutes; see bench/gpu.py):
#   bench/gpu.sh                      # writes runs/bench-gpu/report.json and report.md
#   bench/gpu.sh --out /some/folder   # any bench/gpu.py option passes through
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" bench/gpu.py "$@"
