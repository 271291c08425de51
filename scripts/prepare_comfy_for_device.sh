#!/usr/bin/env bash
# Copy a ComfyUI checkout into .comfy/ComfyUI (git-ignored) so that it travels with the working
# tree to the GPU machine (carry: [".comfy"]), where `python -m pisa_lab.e2e` imports it.
#
#   bash scripts/prepare_comfy_for_device.sh [SOURCE] [DEST]
#       SOURCE  default $COMFYUI_PATH, else ~/comfy/ComfyUI
#       DEST    default .comfy/ComfyUI (relative to the repository root)
#
# Only what importing ComfyUI's model code needs is kept: no .git, tests, front-end or web
# assets, tokenizer vocabularies, API nodes, example inputs, models, blueprints or caches.
# Fails if the copy is larger than MAX_MB (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:-${COMFYUI_PATH:-$HOME/comfy/ComfyUI}}"
dest="${2:-.comfy/ComfyUI}"
max_mb="${MAX_MB:-20}"
if [ ! -f "$src/comfy/model_patcher.py" ]; then
  echo "no ComfyUI checkout at $src" >&2
  exit 1
fi
rm -rf "$dest"
mkdir -p "$dest"
# Paths are matched against names inside the archive, which start with "./".
tar -C "$src" -cf - \
  --exclude='./.git' --exclude='./.github' --exclude='./.ci' \
  --exclude='./tests' --exclude='./tests-unit' \
  --exclude='./web' --exclude='./custom_nodes' --exclude='./models' --exclude='./input' \
  --exclude='./output' --exclude='./temp' --exclude='./user' --exclude='./blueprints' \
  --exclude='./comfy_api_nodes' --exclude='./script_examples' --exclude='./notebooks' \
  --exclude='*_tokenizer' --exclude='*tokenizer*.json' --exclude='*.model' --exclude='*vocab*' \
  --exclude='*merges*.txt' --exclude='*.safetensors' --exclude='*.ckpt' --exclude='*.pt' --exclude='*.pth' \
  --exclude='*.png' --exclude='*.jpg' --exclude='*.webp' --exclude='*.gif' --exclude='*.mp4' \
  --exclude='__pycache__' --exclude='*.pyc' \
  . | tar -C "$dest" -xf -
kb=$(du -sk "$dest" | cut -f1)
echo "copied $src -> $dest: $((kb / 1024)) MB ($(find "$dest" -type f | wc -l) files)"
if [ "$kb" -gt $((max_mb * 1024)) ]; then
  echo "the copy is larger than ${max_mb} MB" >&2
  exit 1
fi
