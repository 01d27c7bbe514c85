#!/usr/bin/env bash
# Issue 7's side-by-side speed benchmark in one run: ours (`bot bench`,
# `train`) and transformers + PEFT (scripts/gpu/hf_reference.py) on the same
# machine, with the same weights (the GGUF written out by `bot export-hf`),
# the same adapter and the same token ids (`bot bench --dump-ids`), for
# Gemma-3-270M and the Gemma-3-1B shape (random weights and a random r 16
# adapter, made here); then ONE markdown table (ours | transformers+PEFT |
# ratio) with the decode floor (weight bytes per step / measured HBM copy
# bandwidth).
#
# On the GPU machine, after stage.sh (binaries `bot` and `train` in
# /tmp/bin) with the default model at model/gemma-3-270m-q4_k_m.gguf (run.sh
# links it); about 6-7 minutes on an H200 at today's speeds (estimated):
#     bash scripts/gpu/speed.sh
# On the dev machine, the CPU rows (small counts; torch, transformers, peft in a venv):
#     DEVICE=cpu BOT=target/release/bot PYTHON=/tmp/hfvenv/bin/python bash scripts/gpu/speed.sh
#
# STEPS (default "270m 1b train" on cuda, "270m" on cpu):
#   270m   export the 270M, `bot bench` (writes the ids), hf_reference.py
#   1b     make the 1B shape, `bot bench` on it, hf_reference.py
#   train  our `train` with the shipped recipe for TRAIN_STEPS steps (270M;
#          the default covers a whole epoch, whose time is then measured, CUDA
#          graph captures included) and TRAIN_STEPS_1B steps (1B), peak GPU
#          memory sampled by nvidia-smi in the background
# The table is printed from whatever results are in $OUT, so parts can be
# rerun alone. Knobs: LIMIT / LIMIT_1B (messages of `bot bench`), LAT
# (batch-1 messages of the slow methods), TRAIN_STEPS, WORK (exports: 0.5 GB
# and 2 GB on cuda), OUT (results: env.txt, ours_*.json, hf_*.json,
# train_*, table.md). TRAIN_AB=1 also times 60 eager 270M steps
# (--graphs off: train_270m-eager.*).
set -euo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/out}
WORK=${WORK:-/tmp/speed}
BOT=${BOT:-bot}
TRAIN=${TRAIN:-train}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-model/gemma-3-270m-q4_k_m.gguf}
ADAPTER=${ADAPTER:-model/adapters/gemma3-270m-nat6c4s2}
HERE=$(cd "$(dirname "$0")" && pwd)
export PATH=/tmp/bin:$PATH RUST_LOG=${RUST_LOG:-warn}
if [[ $DEVICE == cuda ]]; then
  STEPS=${STEPS:-"270m 1b train"}
  LIMIT=${LIMIT:-120} LIMIT_1B=${LIMIT_1B:-60} LAT=${LAT:-12} TRAIN_STEPS=${TRAIN_STEPS:-640}
  TRAIN_STEPS_1B=${TRAIN_STEPS_1B:-60}
  SIZES=${SIZES:-1,8,32,128} DECODE=${DECODE:-64} DTYPE=bf16 HF_SKIP=${HF_SKIP:-}
else
  STEPS=${STEPS:-"270m"}
  LIMIT=${LIMIT:-12} LIMIT_1B=${LIMIT_1B:-4} LAT=${LAT:-3} TRAIN_STEPS=${TRAIN_STEPS:-3}
  TRAIN_STEPS_1B=${TRAIN_STEPS_1B:-3}
  SIZES=${SIZES:-1,8} DECODE=${DECODE:-16} DTYPE=f32 HF_SKIP=${HF_SKIP:-train,bandwidth}
fi
# Training recipes of the reference: the issue's anchor (r 32 on q/k/v/o,
# 8 x 96 tokens) and the shipped recipe (r 16 on every projection) at about
# our training rows' mean length (157 tokens).
ALL=q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj
RECIPES=${RECIPES:-"32:16:q_proj+k_proj+v_proj+o_proj:96 16:16:$ALL:160"}
# The shipped adapter's recipe (its train_args.json).
SHIPPED=(--lora-r 16 --lora-alpha 16 --targets "${ALL//+/,}" --lr 5e-4 --epochs 3 --batch-size 8 --grad-accum 1)
mkdir -p "$OUT" "$WORK"
# run.sh assembles the default model under /tmp/stage and links it here.
if [[ ! -e $MODEL && -f /tmp/stage/gemma-3-270m-q4_k_m.gguf ]]; then
  mkdir -p "$(dirname "$MODEL")"
  ln -sf /tmp/stage/gemma-3-270m-q4_k_m.gguf "$MODEL"
fi
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
# Drops the progress bars of transformers' loading and saving.
quiet() { grep --line-buffered -v -e '^Loading weights' -e '^Writing model shards' || true; }

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: DEVICE=$DEVICE STEPS=\"$STEPS\" LIMIT=$LIMIT LIMIT_1B=$LIMIT_1B LAT=$LAT DECODE=$DECODE TRAIN_STEPS=$TRAIN_STEPS TRAIN_STEPS_1B=$TRAIN_STEPS_1B bash scripts/gpu/speed.sh"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "bot: $($BOT --version 2>&1 | head -n 1)"
  echo "cpu: $(nproc) threads, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,pstate --format=csv
  fi
  $PYTHON -c 'import sys, torch, transformers, peft; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}")' 2>&1 || true
} | tee "$OUT/env.txt"

if has 270m; then
  stamp "270M: export to a Hugging Face directory ($DTYPE)"
  $BOT --base-model "$MODEL" export-hf "$WORK/hf270" --dtype $DTYPE
  stamp "270M: ours"
  $BOT --base-model "$MODEL" --adapter "$ADAPTER" --device "$DEVICE" bench --limit "$LIMIT" \
    --batch-sizes "$SIZES" --image-limit 30 --decode-steps "$DECODE" --generate 40 --generate-limit "$LAT" \
    --out "$OUT/ours_270m.json" --dump-ids "$WORK/ids_270m.jsonl" 2>&1 | tee "$OUT/ours_270m.txt"
  cp "$WORK/ids_270m.jsonl" "$OUT/"
  stamp "270M: transformers + PEFT"
  $PYTHON "$HERE/hf_reference.py" --model "$WORK/hf270" --adapter "$ADAPTER" --ids "$WORK/ids_270m.jsonl" \
    --out "$OUT/hf_270m.json" --latency-limit "$LAT" --original-unmerged --batch-sizes "$SIZES" --decode-steps "$DECODE" \
    --train-recipes "$RECIPES" --skip "$HF_SKIP" 2>&1 | quiet | tee "$OUT/hf_270m.txt"
fi

if has 1b; then
  [[ -f $WORK/hf270/tokenizer.json ]] || $BOT --base-model "$MODEL" export-hf "$WORK/hf270" --dtype $DTYPE
  stamp "1B shape: random weights and adapter"
  $PYTHON "$HERE/hf_reference.py" --make-1b "$WORK/hf1b" --tokenizer "$WORK/hf270/tokenizer.json" 2>&1 \
    | quiet
  stamp "1B shape: ours (routes of random weights mean nothing; the timings do)"
  $BOT --base-model "$WORK/hf1b" --adapter "$WORK/hf1b/adapter" --device "$DEVICE" bench --limit "$LIMIT_1B" \
    --batch-sizes "$SIZES" --image-limit 10 --decode-steps "$DECODE" --generate 40 --generate-limit "$LAT" \
    --out "$OUT/ours_1b.json" --dump-ids "$WORK/ids_1b.jsonl" 2>&1 | tee "$OUT/ours_1b.txt"
  stamp "1B shape: transformers + PEFT"
  $PYTHON "$HERE/hf_reference.py" --model "$WORK/hf1b" --adapter "$WORK/hf1b/adapter" --ids "$WORK/ids_1b.jsonl" \
    --out "$OUT/hf_1b.json" --latency-limit "$LAT" --original-unmerged --batch-sizes "$SIZES" --decode-steps "$DECODE" \
    --train-recipes "$RECIPES" --skip "$HF_SKIP" 2>&1 | quiet | tee "$OUT/hf_1b.txt"
fi

# Our training: the shipped recipe for TRAIN_STEPS steps. `--stop-after`
# ends the run right after the last timed step (no validation, evaluation or
# adapter; the exit status is therefore non-zero).
train_run() {
  local name=$1 base=$2 steps=$3
  shift 3
  rm -rf "$WORK/adapters/speed-$name" "$WORK/adapters/speed-$name.partial"
  local smi=""
  if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1 > "$OUT/train_${name}_gpu_idle.txt"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/train_${name}_gpu_mem.txt" &
    smi=$!
  fi
  $TRAIN --base-model "$base" --no-adapter --device "$DEVICE" --out-dir "$WORK/adapters" --name "speed-$name" \
    --current "$WORK/adapters/current" --no-promote --save-every 0 --eval-every 0 "${SHIPPED[@]}" "$@" \
    --max-steps $((steps + 1)) --stop-after "$steps" > "$OUT/train_$name.txt" 2>&1 || true
  [[ -n $smi ]] && kill "$smi" 2>/dev/null || true
  grep -v '^\s*$' "$OUT/train_$name.txt" | grep -v 'train \[' | tail -n 4 || true
  cp "$WORK/adapters/speed-$name.partial/training_log.jsonl" "$OUT/train_$name.jsonl" 2>/dev/null || echo "no training log for $name"
}
if has train; then
  stamp "train: ours, 270M, shipped recipe, $TRAIN_STEPS steps"
  train_run 270m "$MODEL" "$TRAIN_STEPS"
  if [[ ${TRAIN_AB:-0} == 1 ]]; then
    stamp "train: ours, 270M, eager steps (--graphs off), 60 steps"
    train_run 270m-eager "$MODEL" 60 --graphs off
  fi
  if [[ -d $WORK/hf1b ]]; then
    stamp "train: ours, 1B shape, shipped recipe, $TRAIN_STEPS_1B steps"
    train_run 1b "$WORK/hf1b" "$TRAIN_STEPS_1B"
  fi
fi

stamp "table"
$PYTHON - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, math, os, re, sys

out = sys.argv[1]


def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None


def get(d, *path):
    for k in path:
        if d is None:
            return None
        if isinstance(k, int):
            d = d[k] if isinstance(d, list) and len(d) > k else None
        else:
            d = d.get(k) if isinstance(d, dict) else None
    return d


def num(x, unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return s + unit


def sci(x):
    return "—" if x is None else f"{x:.1e}"


def ratio(ours, theirs, lower_is_better):
    if not ours or not theirs:
        return "—"
    return f"{(theirs / ours if lower_is_better else ours / theirs):.1f}x"


def train_summary(name):
    """Our steady training rate from the log: tokens_i = tps_i * (elapsed_i - c),
    c (the loop's start) fitted by least squares with tokens_i ~ m * i."""
    path = os.path.join(out, f"train_{name}.jsonl")
    if not os.path.exists(path):
        return None
    rows = [json.loads(l) for l in open(path) if l.strip()]
    rows = [r for r in rows if r.get("tokens_per_s")]
    if len(rows) < 4:
        return None
    # Solve [sum t^2, -sum t*i; -sum t*i, sum i^2] [c; m] = [sum t^2 e; -sum t e i] (y = t*e = t*c + m*i).
    a11 = sum(r["tokens_per_s"] ** 2 for r in rows)
    a12 = sum(r["tokens_per_s"] * r["step"] for r in rows)
    a22 = sum(r["step"] ** 2 for r in rows)
    b1 = sum(r["tokens_per_s"] ** 2 * r["elapsed_s"] for r in rows)
    b2 = sum(r["tokens_per_s"] * r["elapsed_s"] * r["step"] for r in rows)
    det = a11 * a22 - a12 * a12
    c = (b1 * a22 - a12 * b2) / det if det else rows[0]["elapsed_s"]
    tokens = [r["tokens_per_s"] * (r["elapsed_s"] - c) for r in rows]
    k = len(rows) // 4  # skip the first quarter (warm-up)
    span = rows[-1]["elapsed_s"] - rows[k]["elapsed_s"]
    steady = (tokens[-1] - tokens[k]) / span if span > 0 else None
    s_per_step = span / (rows[-1]["step"] - rows[k]["step"]) if span > 0 else None
    res = {"steps": rows[-1]["step"], "cumulative_tokens_per_s": rows[-1]["tokens_per_s"],
           "tokens_per_s": steady, "s_per_step": s_per_step}
    text = open(os.path.join(out, f"train_{name}.txt"), errors="replace").read()
    m = re.search(r"train (\d+) rows", text)
    if m and s_per_step:
        res["rows"] = int(m.group(1))
        spe = res["steps_per_epoch"] = math.ceil(int(m.group(1)) / 8)
        res["s_per_epoch"] = spe * s_per_step
        if rows[-1]["step"] >= spe and rows[0]["step"] == 1:
            # A whole epoch was run: its time from the start of step 1 to the
            # end of step `spe`, every capture included.
            epoch = [r for r in rows if r["step"] <= spe]
            span = epoch[-1]["elapsed_s"] - (epoch[0]["elapsed_s"] - epoch[0]["step_s"])
            res["s_per_epoch"] = span
            res["epoch_measured"] = True
            res["epoch_tokens_per_s"] = sum(r["step_tokens"] for r in epoch) / span
    mem = os.path.join(out, f"train_{name}_gpu_mem.txt")
    if os.path.exists(mem):
        idle = float(open(os.path.join(out, f"train_{name}_gpu_idle.txt")).read().split()[0])
        used = [float(x) for x in open(mem).read().split() if x.replace(".", "").isdigit()]
        if used:
            res["peak_gib"] = (max(used) - idle) / 1024
    return res


print(open(os.path.join(out, "env.txt")).read().strip().replace("\n", "  \n"))
for size, label in [("270m", "Gemma-3-270M (Q4_K_M dequantized), shipped adapter"),
                    ("1b", "Gemma-3-1B shape, random weights, random r 16 adapter")]:
    ours, hf, tr = load(f"ours_{size}.json"), load(f"hf_{size}.json"), train_summary(size)
    if ours is None and hf is None and tr is None:
        continue
    rows = []

    def row(measure, o, h, lower=True, unit=""):
        r = "—" if lower is None else ratio(o, h, lower)
        rows.append(f"| {measure} | {num(o, unit)} | {num(h, unit)} | {r} |")

    n = get(ours, "decoder", "prompt_tokens") or get(hf, "prompt_tokens")
    for route in ["chat", "image"]:
        for q in ["p50", "p95"]:
            row(f"decision at batch 1, {route}, {q} (ms)", get(ours, "decision", route, f"{q}_ms"),
                get(hf, "fair", f"decision_{route}", f"{q}_ms"))
    for q in ["p50", "p95"]:
        row(f"full image call at batch 1, {q} (ms)", get(ours, "image_call", "latency", f"{q}_ms"),
            get(hf, "fair", "image_call", f"{q}_ms"))
    gen = get(ours, "generate", "max_new_tokens") or get(hf, "original", "max_new_tokens") or 40
    for q in ["p50", "p95"]:
        row(f"original's method: generate up to {gen} tokens, {q} (ms; transformers: PEFT unmerged)",
            get(ours, "generate", "latency", f"{q}_ms"), get(hf, "original", "all", f"{q}_ms"))
    row("  mean new tokens of that", get(ours, "generate", "mean_new_tokens"),
        get(hf, "original", "mean_new_tokens"), lower=None)
    row(f"one forward over the {n}-token prompt (ms; ours: prefill into the cache)",
        get(ours, "decoder", "prefill_ms"), get(hf, "forward_ms_merged"))
    row("  the same, PEFT unmerged (ms)", get(ours, "decoder", "prefill_ms"), get(hf, "forward_ms_unmerged"))
    row("prefill (tokens/s)", get(ours, "decoder", "prefill_tokens_per_s"), get(hf, "prefill_tokens_per_s"), lower=False)
    row("decode (ms per token; ours: eager, next token kept on the GPU)", get(ours, "decoder", "decode_ms_per_token"), get(hf, "decode_ms_per_token"))
    row("  ours replayed from a CUDA graph, token read back each step (ms per token)",
        get(ours, "decoder", "replayed_decode_ms_per_token"), get(hf, "decode_ms_per_token"))
    hf_tp = {r["batch"]: r["messages_per_s"] for r in get(hf, "throughput") or []}
    ours_rows = get(ours, "rows") or []
    for b in sorted({r["batch"] for r in ours_rows} | set(hf_tp)):
        o = next((r["messages_per_s"] for r in ours_rows if r["batch"] == b and r["mode"] == "decision"), None)
        row(f"decisions/s, {b} arriving together (transformers: one forward each)", o, hf_tp.get(b), lower=False)
    for r in ours_rows:
        if r["mode"] == "route":
            row(f"whole routes/s (prompts written), {r['batch']} together", r["messages_per_s"], None, lower=False)
    hf_train = get(hf, "train") or []
    shipped = next((t for t in hf_train if t["r"] == 16), None)
    anchor = next((t for t in hf_train if t["r"] == 32), None)
    row("training tokens/s, shipped recipe (r 16, all projections, batch 8; transformers: 8 x 160 tokens)",
        get(tr, "tokens_per_s"), get(shipped, "tokens_per_s"), lower=False)
    row("  ours averaged over all steps, first included (tokens/s)", get(tr, "cumulative_tokens_per_s"), None, lower=False)
    row("  transformers, the issue's anchor: r 32 on q/k/v/o, 8 x 96 tokens (tokens/s)", None,
        get(anchor, "tokens_per_s"), lower=False)
    est = (tr or {}).get("steps_per_epoch")
    how = "measured, captures included" if get(tr, "epoch_measured") else "ours: at the steady s/step"
    row(f"one epoch of the shipped recipe (s; {est or '?'} steps; {how}; transformers: at its s/step)",
        get(tr, "s_per_epoch"), est * shipped["s_per_step"] if est and shipped else None)
    row("  ours: tokens/s over that whole epoch", get(tr, "epoch_tokens_per_s"), get(shipped, "tokens_per_s"), lower=False)
    row("peak GPU memory in training (GiB; ours: nvidia-smi over idle, transformers: torch reserved)",
        get(tr, "peak_gib"), get(shipped, "peak_reserved_gib"))
    agree = get(hf, "agreement")
    print(f"\n### {label}\n")
    print("| measure | ours | transformers+PEFT | ratio (>1: ours faster) |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    if agree:
        print(f"\nSame ids, both stacks: routes agree on {agree.get('same_route')}/{agree.get('messages')}, "
              f"call probability within {sci(agree.get('max_call_probability_diff'))}, "
              f"top logits of the typical prompt within {sci(agree.get('max_top_logit_diff'))}.")
    bw, wb = get(hf, "hbm_copy_tb_s"), get(hf, "weight_bytes_per_decode_step")
    dec = get(ours, "decoder", "replayed_decode_ms_per_token") or get(ours, "decoder", "decode_ms_per_token")
    if bw and wb:
        floor = wb / (bw * 1e12) * 1e3
        print(f"\nFloor: {wb / 1e6:,.0f} MB of bf16 weights read per decode step / {bw:.2f} TB/s measured "
              f"HBM copy bandwidth = {floor:.3f} ms per token" + (f"; ours decodes at {dec / floor:.0f}x the floor." if dec else "."))
PY
stamp done
