#!/usr/bin/env bash
# Everything the GPU checks and times on a commit, in one device call (METHOD.md: few, full calls;
# about 6-8 minutes on an H200).  Writes logs and JSON to $OUT (default out/gpu).
#
#   phase 1, side by side (checks only: no number of theirs is a time):
#     the GPU suite (scripts/gpu_tests.py: tests/kernels/test_gpu.py and the 2,000-case GPU fuzz),
#     the real-size soak (python -m pisa_lab.e2e.soak, 20 runs), the fidelity eval at real sizes
#   phase 2, alone on the GPU: the kernel benchmark (python -m pisa_lab.bench), dense and PISA
#     and Sol-Attn (when comfy-kitchen is carried in .comfy/kitchen) in one process.
#
# Carry [".comfy"] (scripts/prepare_comfy_for_device.sh; comfy-kitchen via
# ../shared/tools/comfy-kitchen-for-device.sh .comfy/kitchen).  PISA_COMMIT names the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "commit ${PISA_COMMIT:-unknown}; $(date -u +%FT%TZ)"

t0=$(date +%s)
python3 scripts/gpu_tests.py --from 0 --jobs "${GPU_JOBS:-14}" --budget "${GPU_TESTS_BUDGET:-300}" \
  > "$OUT/gpu_tests.log" 2>&1 &
tests=$!
COMFYUI_PATH=.comfy/ComfyUI timeout 240 python3 -m pisa_lab.e2e.soak --runs 20 --json "$OUT/soak.json" \
  > "$OUT/soak.log" 2>&1 &
soak=$!
timeout 240 python3 -m pisa_lab.eval --sets full --sparsities 0.75 0.875 0.94 --tails lognormal \
  --json "$OUT/eval.json" --out "$OUT/eval" ${EVAL_ARGS:-} > "$OUT/eval.log" 2>&1 &
eval_pid=$!
wait $tests; echo "gpu_tests rc $?"; grep -E "^(group|summary|not run|all|FAIL|PASS)|passed|failed" "$OUT/gpu_tests.log" | tail -20
wait $soak; echo "soak rc $?"; tail -1 "$OUT/soak.log" | cut -c1-1200
wait $eval_pid; echo "eval rc $?"; tail -4 "$OUT/eval.log"
echo "phase 1: $(( $(date +%s) - t0 )) s"

PYTHONPATH=.comfy/kitchen${PYTHONPATH:+:$PYTHONPATH} timeout "${BENCH_TIMEOUT:-240}" python3 -m pisa_lab.bench \
  --sparsities 0.875 0.94 --tails plain lognormal ${BENCH_ARGS:-} --json "$OUT/bench.json" --md "$OUT/bench.md" \
  > "$OUT/bench.log" 2>&1
echo "bench rc $?"; tail -40 "$OUT/bench.log"
echo "total: $(( $(date +%s) - t0 )) s"
