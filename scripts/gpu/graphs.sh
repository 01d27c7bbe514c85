#!/usr/bin/env bash
# On the GPU machine, after stage.sh (binaries in /tmp/bin) and run.sh's
# model assembly: one inference option on (A) against off (B), by default
# steps replayed from CUDA graphs against eager steps
# (FLAG=cuda-graphs A=auto B=off); FLAG=fused-kernels A=on B=off compares
# the fused kernels with candle's.
#   kernels: the fused kernels' GPU tests (tests/fused_cuda.rs; its binary
#            staged as /tmp/bin/fused_cuda);
#   tiny:    the tiny fixture: the same outputs with A and B;
#   eval:    the default model and shipped adapter: `train eval` on both
#            test files with A and B, every row's route and prompt compared;
#   bench:   `bot bench` at batch 1, 8, 32 and 128 with A, then B.
# STEPS (default "tiny eval bench") picks parts; results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out/graphs}
STEPS=${STEPS:-"tiny eval bench"}
LIMIT=${LIMIT:-200}
FLAG=${FLAG:-cuda-graphs} A=${A:-auto} B=${B:-off}
SIZES=${SIZES:-1,8,32}
mkdir -p "$OUT"
export PATH=/tmp/bin:$PATH RUST_LOG=${RUST_LOG:-warn}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

if [[ " $STEPS " == *" kernels "* ]]; then
  stamp "fused kernels' GPU tests"
  fused_cuda --test-threads=1 > "$OUT/fused_cuda.txt" 2>&1
  echo "rc=$?"; grep -E "^test |test result|panicked|relative" "$OUT/fused_cuda.txt" | head -n 20
fi

if [[ " $STEPS " == *" tiny "* ]]; then
  msgs=("draw a cat draw a cat" "hello there" "x" "幫我畫一隻貓 🐱" "a b c a b c a b c")
  for g in "$B" "$A"; do
    bot --base-model tests/fixtures/tiny_gemma3 --no-adapter --device cuda --"$FLAG" "$g" route --json --full \
      --max-new-tokens 24 "${msgs[@]}" > "$OUT/tiny_$g.jsonl" 2> "$OUT/tiny_$g.err"
    echo "tiny $FLAG $g rc=$? $(python3 -c 'import sys,json; print([json.loads(l)["output"] for l in open(sys.argv[1])])' "$OUT/tiny_$g.jsonl")"
  done
  tail -n 3 "$OUT/tiny_$A.err"
fi

if [[ " $STEPS " == *" eval "* ]]; then
  for g in "$A" "$B"; do
    stamp "train eval, $FLAG $g"
    train --device cuda --"$FLAG" "$g" eval --predictions "$OUT/pred_$g.jsonl" > "$OUT/eval_$g.txt" 2>&1
    echo "rc=$?"; grep -E "F1|precision|rows" "$OUT/eval_$g.txt" | head -n 8
  done
  python3 - "$OUT/pred_$A.jsonl" "$OUT/pred_$B.jsonl" "$FLAG $A" "$FLAG $B" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
keys = [k for k in ("pred", "prompt", "output") if a and k in a[0]]
same = sum(all(x.get(k) == y.get(k) for k in keys) for x, y in zip(a, b))
print(f"{sys.argv[3]} vs {sys.argv[4]}: {same}/{len(a)} rows identical in {keys} ({len(b)} rows)")
for x, y in zip(a, b):
    if any(x.get(k) != y.get(k) for k in keys):
        print("  differs:", {k: (x.get(k), y.get(k)) for k in keys})
PY
fi

if [[ " $STEPS " == *" bench "* ]]; then
  for g in "$A" "$B"; do
    stamp "bench, $FLAG $g"
    bot --device cuda --"$FLAG" "$g" bench --limit "$LIMIT" --batch-sizes "$SIZES" --decode-steps 64 \
      --out "$OUT/bench_$g.json" > "$OUT/bench_$g.txt" 2>&1
    echo "rc=$?"; grep -E "decision|image call|decoder|replayed|decisions/s|batch" "$OUT/bench_$g.txt" | head -n 14
  done
fi
stamp done
