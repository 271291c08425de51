#!/usr/bin/env bash
# Set everything up on a fresh Linux machine and run the whole test suite (CPU; Triton kernels
# run under TRITON_INTERPRET=1; GPU tests run too when CUDA is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -rs tests "$@"
