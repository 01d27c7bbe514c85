#!/usr/bin/env bash
# On the GPU machine, after stage.sh (binaries in /tmp/bin): training checks.
#   tiny   the tiny fixture, three steps without dropout on the host CPU
#          (f32) and on CUDA (bf16): the losses must agree (bf16 tolerance);
#   graphs the shipped recipe without dropout for GRAPH_STEPS steps on the
#          default model: eager whole rows (`--graphs off --shared-prefix
#          off`) and steps replayed from CUDA graphs, whole rows and with the
#          shared prefix passed once: every step's loss must agree with the
#          eager one (bf16 tolerance); and each run's speed;
#   epoch  one whole epoch of the shipped recipe, replayed steps, for each
#          --shared-prefix setting in EPOCH_SHARE (default "on off"): its
#          time, every capture included, and tokens/s over it;
#   profile every staged `train_profile*` build (examples/train_profile.rs;
#          no model files needed): one training pass of the random-weight
#          270M shape, eager and replayed, with the graph's nodes by kind
#          and kernel; PROFILE_ARGS adds arguments;
#   speed  the shipped recipe on the default model (after run.sh assembled
#          it) for SPEED_STEPS steps with `train` and, when OLD names another
#          binary, with that one too: median seconds per step and tokens/s
#          over the steps after the first five.
# STEPS (default "tiny speed") picks parts; results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out/train-check}
STEPS=${STEPS:-"tiny speed"}
SPEED_STEPS=${SPEED_STEPS:-40}
WORK=${WORK:-/tmp/train-check}
mkdir -p "$OUT" "$WORK"
export PATH=/tmp/bin:$PATH RUST_LOG=${RUST_LOG:-warn,train=info}
ALL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
SHIPPED=(--lora-r 16 --lora-alpha 16 --targets "$ALL" --lr 5e-4 --epochs 3 --batch-size 8 --grad-accum 1)

# A run of `steps` steps that stops right after the last one (no validation,
# evaluation or adapter: its exit status is non-zero by design); the
# training log lands in $OUT/train_NAME.jsonl.
run() {
  local bin=$1 name=$2 steps=$3
  shift 3
  rm -rf "$WORK/$name" "$WORK/$name.partial"
  "$bin" --out-dir "$WORK" --name "$name" --current "$WORK/current-$name" --no-promote \
    --save-every 0 --eval-every 0 --no-adapter "$@" --max-steps $((steps + 1)) --stop-after "$steps" \
    > "$OUT/train_$name.txt" 2>&1
  cp "$WORK/$name.partial/training_log.jsonl" "$OUT/train_$name.jsonl" 2>/dev/null \
    || { echo "$name: no training log"; tail -n 5 "$OUT/train_$name.txt"; }
}

summary() {
  python3 - "$@" <<'PY'
import json, statistics, sys
for path in sys.argv[1:]:
    try:
        rows = [json.loads(l) for l in open(path)]
    except OSError:
        print(f"{path}: missing"); continue
    later = rows[5:] or rows
    s = statistics.median(r["step_s"] for r in later)
    t = statistics.median(r["step_tokens"] / r["step_s"] for r in later)
    print(f"{path.rsplit('/', 1)[-1]}: {len(rows)} steps, median {s * 1000:.1f} ms/step, "
          f"{t:,.0f} tokens/s; losses {[round(r['loss'], 4) for r in rows[:4]]}")
PY
}

if [[ " $STEPS " == *" tiny "* ]]; then
  for dev in cpu cuda; do
    run train "tiny-$dev" 3 --base-model tests/fixtures/tiny_gemma3 --device "$dev" \
      --lora-r 4 --lora-alpha 8 --targets "$ALL" --lora-dropout 0 --batch-size 4
  done
  python3 - "$OUT/train_tiny-cpu.jsonl" "$OUT/train_tiny-cuda.jsonl" <<'PY'
import json, sys
try:
    a, b = ([json.loads(l)["loss"] for l in open(p)] for p in sys.argv[1:])
except OSError as e:
    sys.exit(f"tiny: MISSING {e.filename}")
worst = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(a, b))
print(f"tiny: cpu losses {[round(x, 4) for x in a]}, cuda {[round(y, 4) for y in b]}, "
      f"largest relative gap {worst:.4f} -> {'ok' if len(a) == len(b) == 3 and worst < 0.03 else 'MISMATCH'}")
PY
fi

if [[ " $STEPS " == *" graphs "* ]]; then
  n=${GRAPH_STEPS:-40}
  run train eager "$n" --device cuda "${SHIPPED[@]}" --lora-dropout 0 --graphs off --shared-prefix off
  for share in off on; do
    run train "graphs-$share" "$n" --device cuda "${SHIPPED[@]}" --lora-dropout 0 --graphs on --shared-prefix "$share"
  done
  summary "$OUT/train_eager.jsonl" "$OUT/train_graphs-off.jsonl" "$OUT/train_graphs-on.jsonl"
  for share in off on; do
    python3 - "$OUT/train_graphs-$share.jsonl" "$OUT/train_eager.jsonl" "$share" <<'PY'
import json, sys
try:
    a, b = ([json.loads(l)["loss"] for l in open(p)] for p in sys.argv[1:3])
except OSError as e:
    sys.exit(f"graphs: MISSING {e.filename}")
gaps = [abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b)]
print(f"graphs, shared prefix {sys.argv[3]}: {len(a)} and {len(b)} steps, loss gap relative to eager: "
      f"median {sorted(gaps)[len(gaps) // 2]:.4f}, largest {max(gaps):.4f} (step {gaps.index(max(gaps)) + 1}) -> "
      f"{'ok' if len(a) == len(b) and max(gaps) < 0.05 else 'MISMATCH'}")
PY
  done
fi

if [[ " $STEPS " == *" epoch "* ]]; then
  for share in ${EPOCH_SHARE:-on off}; do
    run train "epoch-$share" "${EPOCH_STEPS:-637}" --device cuda "${SHIPPED[@]}" --graphs on --shared-prefix "$share"
    grep -m1 -o 'train [0-9]* rows' "$OUT/train_epoch-$share.txt" || true
    python3 - "$OUT/train_epoch-$share.jsonl" "$share" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
span = rows[-1]["elapsed_s"] - (rows[0]["elapsed_s"] - rows[0]["step_s"])
tokens = sum(r["step_tokens"] for r in rows)
later = sorted(r["step_s"] for r in rows[len(rows) // 4:])
print(f"epoch, shared prefix {sys.argv[2]}: {len(rows)} steps in {span:.2f} s (captures included), "
      f"{tokens / span:,.0f} tokens/s; median step {later[len(later) // 2] * 1000:.1f} ms after the first quarter")
PY
    grep -m1 'replayed training steps' "$OUT/train_epoch-$share.txt" | sed 's/^.*replayed training steps/  replayed training steps/' || true
  done
fi

if [[ " $STEPS " == *" profile "* ]]; then
  for bin in /tmp/bin/train_profile*; do
    name=$(basename "$bin")
    "$bin" --device cuda --shape 270m ${PROFILE_ARGS:-} > "$OUT/$name.txt" 2>&1
    echo "== $name"
    grep -E '^\| (eager|replayed)|^graph nodes' "$OUT/$name.txt" || tail -n 5 "$OUT/$name.txt"
  done
fi

if [[ " $STEPS " == *" speed "* ]]; then
  run train speed-new "$SPEED_STEPS" --device cuda "${SHIPPED[@]}"
  logs=("$OUT/train_speed-new.jsonl")
  if [[ -n ${OLD:-} && -x $OLD ]]; then
    run "$OLD" speed-old "$SPEED_STEPS" --device cuda "${SHIPPED[@]}"
    logs+=("$OUT/train_speed-old.jsonl")
  fi
  summary "${logs[@]}"
fi
