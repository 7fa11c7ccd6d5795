#!/usr/bin/env bash
# Slim CPU-only install of fade-sglang + SGLang 0.5.23 into .venv (no CUDA wheels).
# Why not `pip install sglang`: it resolves to an ~11 GB CUDA stack. See README "Install".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FADE_VENV:-.venv}
PY=${PYTHON:-python3}
log() { printf '[install-cpu] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --disable-pip-version-check -q)

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"

if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  log "installing torch 2.13.0 (CPU wheel)"
  # pip (not uv): the CPU wheel lies on local disk and pip's config points at it.
  "${PIP[@]}" torch==2.13.0
fi

if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('sglang') == '0.5.23' else 1)" 2>/dev/null; then
  log "installing sglang 0.5.23 (no deps) and its CPU-safe runtime deps"
  "${PIP[@]}" --no-deps sglang==0.5.23
fi
"${PIP[@]}" -c "$CONSTRAINTS" \
  triton==3.8.0 transformers==5.19.0 tokenizers==0.23.2 apache-tvm-ffi==0.1.11 \
  compressed-tensors==0.18.0 xgrammar==0.2.7 sentencepiece==0.2.1 openai==2.8.0 \
  openai-harmony==0.0.4 soundfile==0.13.1 numpy orjson psutil pybase64 requests packaging \
  pillow starlette msgspec pydantic pyzmq tqdm ipython aiohttp dill gguf partial-json-parser \
  einops uvicorn uvloop fastapi setproctitle jsonschema python-multipart \
  prometheus_client safetensors matplotlib pytest hypothesis accelerate

log "installing fade-sglang (editable)"
"${PIP[@]}" -c "$CONSTRAINTS" --no-build-isolation -e . 2>/dev/null || "${PIP[@]}" -c "$CONSTRAINTS" -e .
log "done: $("$VPY" -c 'import torch, sglang, triton; print(f"torch {torch.__version__}, sglang {sglang.__version__}, triton {triton.__version__}")' 2>/dev/null || echo 'import check failed')"
