#!/usr/bin/env bash
# Everything the GPU checks and times on a commit, in one device call (METHOD.md: few, full calls;
# about 6-8 minutes on an H200).  Writes logs and JSON to $OUT (default out/gpu).
#
#   phase 1, side by side (checks only: no number of theirs is a time):
#     the GPU suite (scripts/gpu_tests.py: tests/kernels/test_gpu.py and the 2,000-case GPU fuzz),
#     the real-size soak (python -m pisa_lab.e2e.soak, 20 runs), the fidelity eval at real sizes
#   phase 2, alone on the GPU: the kernel benchmark (python -m pisa_lab.bench), dense and PISA
#     and Sol-Attn (when comfy-kitchen is carried in .comfy/kitchen) in one process, on random
#     inputs (sparsity 0.875, both tails, top-k and adaptive routing, the Triton and the Hopper
#     forward kernels) and on DiT-like ones; then the node's real calls (pisa_lab.bench_node_calls) with the
#     node's forward kernel and with the Triton one.
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
python3 scripts/gpu_tests.py --from 0 --jobs "${GPU_JOBS:-14}" --budget "${GPU_TESTS_BUDGET:-330}" \
  > "$OUT/gpu_tests.log" 2>&1 &
tests=$!
COMFYUI_PATH=.comfy/ComfyUI timeout 240 python3 -m pisa_lab.e2e.soak --runs 20 --json "$OUT/soak.json" \
  > "$OUT/soak.log" 2>&1 &
soak=$!
PYTHONPATH=.comfy/kitchen${PYTHONPATH:+:$PYTHONPATH} timeout 300 python3 -m pisa_lab.eval --sets full \
  --sparsities 0.75 0.875 0.94 --tails lognormal --routings topk cov adaptive \
  --json "$OUT/eval.json" --out "$OUT/eval" > "$OUT/eval.log" 2>&1 &
eval_pid=$!
wait $tests; echo "gpu_tests rc $?"; tail -18 "$OUT/gpu_tests.log"
wait $soak; echo "soak rc $?"; tail -1 "$OUT/soak.log" | cut -c1-1500
wait $eval_pid; echo "eval rc $?"; tail -3 "$OUT/eval.log"
echo "phase 1: $(( $(date +%s) - t0 )) s"

# phase 2, one benchmark at a time (each writes its JSON when it ends)
bench() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  PYTHONPATH=.comfy/kitchen${PYTHONPATH:+:$PYTHONPATH} timeout "$limit" python3 -m pisa_lab.bench "$@" \
    --json "$OUT/$name.json" --md "$OUT/$name.md" > "$OUT/$name.log" 2>&1
  echo "$name rc $?: $(( $(date +%s) - t0 )) s"; tail -45 "$OUT/$name.log" | cut -c1-160
}
bench bench_random "${BENCH_TIMEOUT:-170}" --sparsities 0.875 --tails plain lognormal --routings topk adaptive \
  --kernels triton gluon
bench bench_dit "${BENCH_DIT_TIMEOUT:-150}" --data dit --shapes wan720 hunyuan720 wan480 flux1024 --sparsities 0.875 \
  --tails lognormal --routings topk adaptive --kernels triton gluon
timeout "${NODE_CALLS_TIMEOUT:-120}" python3 -m pisa_lab.bench_node_calls --kernels auto triton --json "$OUT/node_calls.json" \
  > "$OUT/node_calls.log" 2>&1
echo "node_calls rc $?: $(( $(date +%s) - t0 )) s"; tail -20 "$OUT/node_calls.log" | cut -c1-160
echo "total: $(( $(date +%s) - t0 )) s"
