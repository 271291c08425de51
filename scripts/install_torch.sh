#!/usr/bin/env bash
# Install torch and a torchvision built for it into the virtual environment $1 (scripts/setup_env.sh
# calls this; ComfyUI's tests need torchvision too). The first rule that applies wins:
#
#   1. keep      the environment already imports torch and torchvision: nothing is installed.
#   2. spec      PISA_TORCH_SPEC is set: `pip install $PISA_TORCH_SPEC`, e.g. "torch==2.9.1
#                torchvision==0.24.1" or "--index-url https://download.pytorch.org/whl/cu128 torch torchvision".
#   3. cpu       no NVIDIA GPU (`nvidia-smi -L` lists none) and PyTorch's CPU index
#                (PISA_TORCH_CPU_INDEX, default https://download.pytorch.org/whl/cpu) answers within
#                10 s: the CPU build from there (a few hundred MB instead of several GB).
#   4. default   pip's default torch: on Linux PyPI's CUDA build (several GB). Where pip is capped at
#                torch<=2.14.1 by /etc/xdg/pip/constraints.txt (machines that keep those wheels on
#                local disk), exactly torch 2.14.1 + torchvision 0.29.1, the pair the cap allows.
#
# It prints one line, "torch: <rule>: <what> (<why>)", before installing.
set -euo pipefail
VENV=$1
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
CPU_INDEX=${PISA_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
CAP=/etc/xdg/pip/constraints.txt

if "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "torch: keep: $("$PY" -c 'import torch; print("torch", torch.__version__)') (already in $VENV)"
  exit 0
fi
if [ -n "${PISA_TORCH_SPEC:-}" ]; then
  echo "torch: spec: $PISA_TORCH_SPEC (PISA_TORCH_SPEC is set)"
  # shellcheck disable=SC2086  # the spec is a list of pip arguments
  "${PIP[@]}" $PISA_TORCH_SPEC
  exit 0
fi
if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  why="an NVIDIA GPU is present"
elif "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=10)" \
    "$CPU_INDEX" >/dev/null 2>&1; then
  echo "torch: cpu: torch torchvision from $CPU_INDEX (no NVIDIA GPU, and that index answered)"
  if "${PIP[@]}" --index-url "$CPU_INDEX" torch torchvision; then
    exit 0
  fi
  why="installing from $CPU_INDEX failed"
else
  why="no NVIDIA GPU, but $CPU_INDEX did not answer within 10 s"
fi
if [ -f "$CAP" ] && grep -q "torch<=2.14.1" "$CAP"; then
  echo "torch: default: torch==2.14.1 torchvision==0.29.1, the pair $CAP allows ($why)"
  "${PIP[@]}" torch==2.14.1 torchvision==0.29.1
else
  echo "torch: default: pip's default torch torchvision, on Linux the CUDA build, several GB ($why;" \
       "set PISA_TORCH_SPEC to choose another)"
  "${PIP[@]}" torch torchvision
fi
