#!/usr/bin/env bash
# On the GPU machine: keep what this call carried in /tmp (which survives
# between calls while the machine stays warm). Carried paths: the default
# model's pip wheels, whole under .stage/ or cut in pieces under
# .stage/pieces/ (scripts/gpu/cut-chunks.sh: a call carries at most 64 MiB,
# the working tree included), and xz-compressed CUDA builds of `bot` and
# `train` under .gpu/. With SMOKE=1, also checks the CUDA build on the tiny
# fixture model against the CPU.
set -euo pipefail
mkdir -p /tmp/stage /tmp/bin
shopt -s nullglob
for w in .stage/*.whl; do cp "$w" /tmp/stage/; done
mkdir -p /tmp/stage/pieces /tmp/stage/gguf
for p in .stage/pieces/*; do cp "$p" /tmp/stage/pieces/; done
# Or the GGUF itself cut in pieces (`split -b 46M model/<gguf> .stage/gguf/part.`).
for p in .stage/gguf/*; do cp "$p" /tmp/stage/gguf/; done
for b in .gpu/*.xz; do
  name=$(basename "$b" .xz)
  xz -dc "$b" > "/tmp/bin/$name"
  chmod +x "/tmp/bin/$name"
done
echo "staged: $(ls /tmp/stage /tmp/stage/pieces /tmp/stage/gguf | tr '\n' ' ')"
echo "binaries: $(ls /tmp/bin | tr '\n' ' ')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [[ "${SMOKE:-0}" == 1 && -x /tmp/bin/bot ]]; then
  export PATH=/tmp/bin:$PATH RUST_LOG=warn
  msgs=("draw a cat" "hello there" "call me" "x")
  for dev in cpu cuda; do
    bot --base-model tests/fixtures/tiny_gemma3 --no-adapter --device "$dev" route --json --full --max-new-tokens 12 "${msgs[@]}" \
      | python3 -c 'import sys,json; print(sys.argv[1], [json.loads(l)["output"] for l in sys.stdin])' "$dev"
  done
  # A few training steps on CUDA with the tiny model (backward through every op).
  if [[ -x /tmp/bin/train ]]; then
    t=$(mktemp -d)
    head -n 40 datas/image_call_train.jsonl > "$t/train.jsonl"
    head -n 8 datas/image_call_test.jsonl > "$t/test.jsonl"
    for dev in cpu cuda; do
      train --base-model tests/fixtures/tiny_gemma3 --device "$dev" --train-file "$t/train.jsonl" --test-file "$t/test.jsonl" \
        --out-dir "$t/$dev" --current "$t/$dev/current" --name smoke --max-steps 3 --lora-r 4 --lora-dropout 0 --no-promote >/dev/null
      python3 -c 'import sys,json; print(sys.argv[1], [round(json.loads(l)["loss"],5) for l in open(sys.argv[2])])' "$dev" "$t/$dev/smoke/training_log.jsonl"
    done
  fi
fi
