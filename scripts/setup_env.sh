#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what the pack,
# its tests and its demo need. Safe to run repeatedly.
#
# torch (scripts/install_torch.sh, which prints which one and why): a torch already in the venv is
# kept; else PISA_TORCH_SPEC is installed if set; else, without an NVIDIA GPU, the CPU build from
# PyTorch's CPU index when that answers within 10 s; else pip's default torch (on Linux the CUDA
# build, several GB; torch 2.14.1 where pip is capped there), each with its torchvision
# (PISA_TORCH_SPEC names its own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PISA_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
bash scripts/install_torch.sh "$VENV"
"${PIP[@]}" -r requirements-dev.txt
# A missing test prerequisite is a warning here, and fatal under CI=true (where tests may not skip).
problem() {
  if [ "${CI:-}" = "true" ]; then echo "error: $1 (CI=true)" >&2; exit 1; fi
  echo "warning: $1" >&2
}
# ComfyUI's own requirements, when a checkout is present (the node tests import the real `comfy`;
# scripts/test.sh puts the pinned checkouts in place before it runs this script).
# PISA_EXTRA_COMFYUI: more checkouts the tests also run against (default: v0.3.64 where it exists;
# set it empty to skip).  Their front-end packages (comfyui-*) pin other versions than the main
# checkout's and an old server cannot start with the new ones, so they go to a side folder,
# $VENV/comfy-frontends/<checkout folder>, that tests put on PYTHONPATH when they start that server.
comfy_reqs() {  # requirements of checkout $1 without torch*; $2 = "frontend" / "rest" / "all"
  grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$1/requirements.txt" | grep -v -E '^\s*(#|$)' \
    | case "$2" in frontend) grep -E '^comfyui-' ;; rest) grep -v -E '^comfyui-' ;; *) cat ;; esac || true
}
MAIN_COMFY="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
CHECKOUTS="$MAIN_COMFY ${PISA_EXTRA_COMFYUI-$HOME/comfy/ComfyUI-v0.3.64}"
[ -n "${PISA_SKIP_COMFY_REQS:-}" ] && CHECKOUTS=""  # the demo needs no ComfyUI
for c in $CHECKOUTS; do
  [ -f "$c/requirements.txt" ] || continue
  if [ "$c" = "$MAIN_COMFY" ]; then
    comfy_reqs "$c" all > "$VENV/comfy-reqs.txt"
  else
    comfy_reqs "$c" rest > "$VENV/comfy-reqs.txt"
    side="$VENV/comfy-frontends/$(basename "$c")"
    comfy_reqs "$c" frontend > "$VENV/comfy-frontend-reqs.txt"
    if ! cmp -s "$VENV/comfy-frontend-reqs.txt" "$side/.requirements" 2>/dev/null; then
      rm -rf "$side" && mkdir -p "$side"
      "${PIP[@]}" --no-deps --target "$side" -r "$VENV/comfy-frontend-reqs.txt" \
        && cp "$VENV/comfy-frontend-reqs.txt" "$side/.requirements" \
        || problem "the front-end packages of $c did not install"
    fi
  fi
  "${PIP[@]}" -r "$VENV/comfy-reqs.txt" || problem "some ComfyUI requirements of $c did not install"
done
echo "environment ready: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

# --- packaging browser test (tests/packaging/test_browser.py) ----------------------------------
# Headless Chromium from Debian's `chromium` package, installed only in CI (CI=true), where it must
# succeed; elsewhere the browser test is skipped with a reason when Chromium is missing.
has_chromium() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
if [ "${CI:-}" = "true" ] && ! has_chromium; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } >/dev/null \
      || true
  fi
  has_chromium || problem "Chromium is not installed and apt-get could not install Debian's chromium (the browser test needs it)"
fi
