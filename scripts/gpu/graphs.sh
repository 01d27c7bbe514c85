#!/usr/bin/env bash
# On the GPU machine, after stage.sh (binaries in /tmp/bin) and run.sh's
# model assembly: steps replayed from CUDA graphs against eager steps.
#   1. the tiny fixture: the same outputs with --cuda-graphs on and off;
#   2. the default model and shipped adapter: `train eval` on both test files
#      with graphs (auto) and without, every row's route and prompt compared;
#   3. `bot bench` at batch 1 and 8, graphs and eager, one after the other.
# STEPS (default "tiny eval bench") picks parts; results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out/graphs}
STEPS=${STEPS:-"tiny eval bench"}
LIMIT=${LIMIT:-200}
mkdir -p "$OUT"
export PATH=/tmp/bin:$PATH RUST_LOG=${RUST_LOG:-warn}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

if [[ " $STEPS " == *" tiny "* ]]; then
  msgs=("draw a cat draw a cat" "hello there" "x" "幫我畫一隻貓 🐱" "a b c a b c a b c")
  for g in off on; do
    bot --base-model tests/fixtures/tiny_gemma3 --no-adapter --device cuda --cuda-graphs "$g" route --json --full \
      --max-new-tokens 24 "${msgs[@]}" > "$OUT/tiny_$g.jsonl" 2> "$OUT/tiny_$g.err"
    echo "tiny graphs $g rc=$? $(python3 -c 'import sys,json; print([json.loads(l)["output"] for l in open(sys.argv[1])])' "$OUT/tiny_$g.jsonl")"
  done
  tail -n 3 "$OUT/tiny_on.err"
fi

if [[ " $STEPS " == *" eval "* ]]; then
  for g in auto off; do
    stamp "train eval, graphs $g"
    train --device cuda --cuda-graphs "$g" eval --predictions "$OUT/pred_$g.jsonl" > "$OUT/eval_$g.txt" 2>&1
    echo "rc=$?"; grep -E "F1|precision|rows" "$OUT/eval_$g.txt" | head -n 8
  done
  python3 - "$OUT/pred_auto.jsonl" "$OUT/pred_off.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
keys = [k for k in ("pred", "prompt", "output") if a and k in a[0]]
same = sum(all(x.get(k) == y.get(k) for k in keys) for x, y in zip(a, b))
print(f"graphs vs eager: {same}/{len(a)} rows identical in {keys} ({len(b)} eager rows)")
for x, y in zip(a, b):
    if any(x.get(k) != y.get(k) for k in keys):
        print("  differs:", {k: (x.get(k), y.get(k)) for k in keys})
PY
fi

if [[ " $STEPS " == *" bench "* ]]; then
  for g in auto off; do
    stamp "bench, graphs $g"
    bot --device cuda --cuda-graphs "$g" bench --limit "$LIMIT" --batch-sizes 1,8,32 --decode-steps 64 \
      --out "$OUT/bench_$g.json" > "$OUT/bench_$g.txt" 2>&1
    echo "rc=$?"; grep -E "decision|image call|decoder|replayed|decisions/s|batch" "$OUT/bench_$g.txt" | head -n 14
  done
fi
stamp done
