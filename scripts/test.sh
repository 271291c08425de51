#!/usr/bin/env bash
# Set everything up on a fresh Linux machine and run the whole test suite (CPU; Triton kernels
# run under TRITON_INTERPRET=1; GPU tests run too when CUDA is present).
#
# ComfyUI for the node and packaging tests: $COMFYUI_PATH and $PISA_EXTRA_COMFYUI where set;
# otherwise the pinned releases in $PISA_COMFY_DIR (default ~/comfy): ComfyUI/ (v0.19.3) and
# ComfyUI-v0.3.64/, fetched by scripts/get_comfyui.sh when absent.  They are in place before
# scripts/setup_env.sh runs, which installs their Python requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
COMFY_DIR=${PISA_COMFY_DIR:-$HOME/comfy}
if [ -z "${COMFYUI_PATH:-}" ]; then
  export COMFYUI_PATH="$COMFY_DIR/ComfyUI"
  bash scripts/get_comfyui.sh v0.19.3 "$COMFYUI_PATH"
fi
if [ -z "${PISA_EXTRA_COMFYUI+set}" ]; then
  export PISA_EXTRA_COMFYUI="$COMFY_DIR/ComfyUI-v0.3.64"
  bash scripts/get_comfyui.sh v0.3.64 "$PISA_EXTRA_COMFYUI"
fi
bash scripts/setup_env.sh
PY="${PISA_VENV:-.venv}/bin/python"
status=0
"$PY" -m pytest -q -rs tests "$@" || status=$?
# One process imports one ComfyUI: the node tests run again against every extra checkout.  A missing
# one was already reported by the packaging tests parametrized over it (a failure under CI=true).
for c in $PISA_EXTRA_COMFYUI; do
  if [ -f "$c/main.py" ]; then
    echo "== tests/comfy against the ComfyUI checkout at $c"
    COMFYUI_PATH="$c" "$PY" -m pytest -q -rs tests/comfy || status=$?
  else
    echo "== no ComfyUI checkout at $c: tests/comfy not run against it"
  fi
done
exit "$status"
