#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch pinned, quantport in editable mode and its dev tools.
# Idempotent: a second run only checks that the venv is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import quantport, modelopt, compressed_tensors, pytest" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
fi
