#!/usr/bin/env bash
# The measurements gpu_all.sh does not make, in one device call (about 8 minutes on an H200):
#   1. where the node's call spends its time, kernel by kernel (python -m pisa_lab.breakdown):
#      Wan 720p and HunyuanVideo 720p, top-k and adaptive routing, and keep-or-drop;
#   2. error against measured time (python -m pisa_lab.tradeoff, issue 17), one set per process
#      (each writes its JSON when it ends, so a set that runs out of time costs only itself).
# Carry [".comfy"] for Sol-Attn (comfy-kitchen in .comfy/kitchen).  PISA_COMMIT names the commit.
# Every file goes to DIAG_DIR (default out/gpu_diag); with OUT set (the device tool's folder, which
# brings back at most 8 files) they also come back as one archive, $OUT/gpu_diag.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${DIAG_DIR:-out/gpu_diag}
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=.comfy/kitchen:.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "commit ${PISA_COMMIT:-unknown}; $(date -u +%FT%TZ)"
t0=$(date +%s)
for spec in "wan720 topk" "wan720 adaptive" "wan720 drop" "hunyuan720 topk" "hunyuan720 adaptive"; do
  set -- $spec
  extra=$([ "$2" = drop ] && echo "--order drop" || echo "--routing $2")
  timeout 90 python3 -m pisa_lab.breakdown --family "$1" $extra --json "$DIR/breakdown_$1_$2.json" \
    > "$DIR/breakdown_$1_$2.md" 2>"$DIR/breakdown_$1_$2.log"
  echo "breakdown $1 $2 rc $?: $(( $(date +%s) - t0 )) s"; head -14 "$DIR/breakdown_$1_$2.md"
done
for spec in flux-image:60 wan-video:150 hunyuan-joint:200; do
  name=${spec%%:*}; limit=${spec##*:}
  timeout "$limit" python3 -m pisa_lab.tradeoff --sets "$name:full" --json "$DIR/tradeoff_$name.json" \
    --md "$DIR/tradeoff_$name.md" --plot "$DIR/tradeoff_$name.png" > "$DIR/tradeoff_$name.log" 2>&1
  echo "tradeoff $name rc $?: $(( $(date +%s) - t0 )) s"; grep "\[tradeoff\]" "$DIR/tradeoff_$name.log" | tail -2
  sed -n "/At matched time/,\$p" "$DIR/tradeoff_$name.md" | grep -v "sol-topk" | head -20
done
echo "total: $(( $(date +%s) - t0 )) s"
if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_diag.tgz" -C "$DIR" . && echo "archive: $OUT/gpu_diag.tgz"; fi
