#!/usr/bin/env bash
# The measurements gpu_all.sh does not make, in one device call (about 8 minutes on an H200):
#   1. where the node's call spends its time, kernel by kernel (python -m pisa_lab.breakdown):
#      Wan 720p and HunyuanVideo 720p, top-k and adaptive routing, and keep-or-drop;
#   2. error against measured time (python -m pisa_lab.tradeoff, issue 17), one set per process
#      (each writes its JSON when it ends, so a set that runs out of time costs only itself).
# Carry [".comfy"] for Sol-Attn (comfy-kitchen in .comfy/kitchen).  PISA_COMMIT names the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.comfy/kitchen:.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "commit ${PISA_COMMIT:-unknown}; $(date -u +%FT%TZ)"
t0=$(date +%s)
for spec in "wan720 topk" "wan720 adaptive" "wan720 drop" "hunyuan720 topk" "hunyuan720 adaptive"; do
  set -- $spec
  extra=$([ "$2" = drop ] && echo "--order drop" || echo "--routing $2")
  timeout 90 python3 -m pisa_lab.breakdown --family "$1" $extra --json "$OUT/breakdown_$1_$2.json" \
    > "$OUT/breakdown_$1_$2.md" 2>"$OUT/breakdown_$1_$2.log"
  echo "breakdown $1 $2 rc $?: $(( $(date +%s) - t0 )) s"; head -14 "$OUT/breakdown_$1_$2.md"
done
for spec in flux-image:60 wan-video:150 hunyuan-joint:200; do
  name=${spec%%:*}; limit=${spec##*:}
  timeout "$limit" python3 -m pisa_lab.tradeoff --sets "$name:full" --json "$OUT/tradeoff_$name.json" \
    --md "$OUT/tradeoff_$name.md" --plot "$OUT/tradeoff_$name.png" > "$OUT/tradeoff_$name.log" 2>&1
  echo "tradeoff $name rc $?: $(( $(date +%s) - t0 )) s"; grep "\[tradeoff\]" "$OUT/tradeoff_$name.log" | tail -2
  sed -n '/At matched time/,$p' "$OUT/tradeoff_$name.md" | grep -v "| pisa@adaptive | pisa " | head -24
done
echo "total: $(( $(date +%s) - t0 )) s"
