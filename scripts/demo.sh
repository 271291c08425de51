#!/usr/bin/env bash
# Set everything up on a fresh Linux machine and run the main job on a built-in default:
# PISA vs dense attention on a DiT-like workload (speed and error, with a plot in out/).
# Runs the Triton kernels on an NVIDIA GPU when there is one, the PyTorch reference otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PISA_SKIP_COMFY_REQS=1 bash scripts/setup_env.sh
exec .venv/bin/python -m pisa_lab.demo --out out "$@"
