#!/usr/bin/env bash
# Make the llm-compressor test fixtures (tests/fixtures/llmcompressor/) in a separate virtual environment.
#
# llm-compressor pins its own transformers and compressed-tensors, so it lives in .venv-llmc, beside the
# project's .venv. torch is shared: .venv-llmc sees .venv's site-packages through a .pth file (listed
# after its own packages), so only llm-compressor and the versions it pins are downloaded.
#
#   bash scripts/make-llmcompressor-fixtures.sh [OUT]    # create/refresh .venv-llmc, write the fixtures (to OUT)
#   LLMC_VENV=/tmp/llmc bash scripts/make-llmcompressor-fixtures.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LLMC_VENV:-$root/.venv-llmc}"
if [ ! -x "$venv/bin/python" ]; then
  "$root/.venv/bin/python" -m venv "$venv"
fi
shared="$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
own="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$shared" > "$own/zz-quantport-shared.pth"
"$venv/bin/python" -m pip install --quiet llmcompressor
"$venv/bin/python" "$root/scripts/llmcompressor_fixtures.py" "${1:-$root/tests/fixtures/llmcompressor}"
