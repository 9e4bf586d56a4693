#!/usr/bin/env bash
# Create .venv (once) with torch==2.13.0, quantport in editable mode and its dev tools.
# Idempotent: a second run only checks that the venv is complete.
#
# torch: on a machine without an NVIDIA driver the CPU build is installed (about 0.2 GB instead of the
# CUDA build's several GB) from PyTorch's CPU index, which serves the same version as 2.13.0+cpu.
# Set QUANTPORT_TORCH_INDEX to use another index (or "pypi" to take the default build from PyPI).
# When the CPU index cannot be reached (offline mirrors), pip's configured indexes are used as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CPU_INDEX=https://download.pytorch.org/whl/cpu

torch_index_args() {
  local index=${QUANTPORT_TORCH_INDEX:-}
  if [ "$index" = "pypi" ]; then
    return
  fi
  if [ -z "$index" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      return  # a GPU machine: PyPI's default (CUDA) build
    fi
    index=$CPU_INDEX
  fi
  if "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" "$index" \
    >/dev/null 2>&1; then
    echo "--extra-index-url $index"
  else
    echo "bootstrap: $index is not reachable; installing torch from pip's configured indexes" >&2
  fi
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import quantport, modelopt, compressed_tensors, pytest, matplotlib, datasets, lm_eval" >/dev/null 2>&1; then
  # shellcheck disable=SC2046  # word splitting of the optional index arguments is intended
  .venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 $(torch_index_args)
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
fi
