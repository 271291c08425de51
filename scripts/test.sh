#!/usr/bin/env bash
# Set everything up on a fresh Linux machine and run the whole test suite (CPU; Triton kernels
# run under TRITON_INTERPRET=1; GPU tests run too when CUDA is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
status=0
.venv/bin/python -m pytest -q -rs tests "$@" || status=$?
# One process imports one ComfyUI: the node tests run again against every extra checkout
# (PISA_EXTRA_COMFYUI, default ~/comfy/ComfyUI-v0.3.64 where it exists; empty to skip).
for c in ${PISA_EXTRA_COMFYUI-$HOME/comfy/ComfyUI-v0.3.64}; do
  if [ -f "$c/main.py" ]; then
    echo "== tests/comfy against the ComfyUI checkout at $c"
    COMFYUI_PATH="$c" .venv/bin/python -m pytest -q -rs tests/comfy || status=$?
  fi
done
exit "$status"
