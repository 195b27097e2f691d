#!/usr/bin/env bash
# The store at scale: a library of N small distinct photos
# (scripts/bench/make_library.py, Fashion-MNIST garments), indexed once with
# the scale benchmark's model, then the commands a user runs on it, timed:
#
#   index      the first `clipdex index` of the library
#   reindex    `clipdex reindex` with nothing changed (best of 3)
#   status     `clipdex status` (best of 3)
#   search     `clipdex search` from a cold process: model, index open,
#              embedding, search (best of 3)
#
#   scripts/bench/store_scale.sh            # 200,000 photos
#   N=50000 scripts/bench/store_scale.sh
#   MODEL=tests/fixtures/models/openai-tiny scripts/bench/store_scale.sh   # (unpacked here)
#
# The model is the scale benchmark's (scripts/bench/scale_data.sh; 512-d
# vectors, as ViT-B/32's) unless MODEL names another; a tiny one indexes in
# minutes where that one takes a quarter of an hour, and the store, scan and
# keyword index do not depend on it. Needs numpy and Pillow (the reference
# venv). Writes target/bench/store/run-N-MODEL.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv-ref/bin/python}
N=${N:-200000}
MODEL=${MODEL:-target/bench/scale/model}
LIB=target/bench/store/library
NAME=$N-$(basename "$MODEL")
IDX=target/bench/store/index-$NAME
OUT=target/bench/store/run-$NAME.json
# A committed fixture's gzipped files are unpacked into a copy.
if [ -f "$MODEL/model.safetensors.gz" ]; then
  COPY=target/bench/store/$(basename "$MODEL")
  mkdir -p "$COPY"
  for f in "$MODEL"/*; do
    case "$f" in
      *.gz) gunzip -c "$f" > "$COPY/$(basename "$f" .gz)" ;;
      *) cp "$f" "$COPY/" ;;
    esac
  done
  MODEL=$COPY
fi
[ -f "$MODEL/model.safetensors" ] || { echo "no model at $MODEL: run scripts/bench/scale_data.sh first" >&2; exit 1; }
mkdir -p target/bench/store
cargo build --release -j2 --bin clipdex
BIN=target/release/clipdex
export RAYON_NUM_THREADS=${THREADS:-2}

"$PY" scripts/bench/make_library.py "$LIB" "$N"
# The library holds exactly N photos (a larger earlier run left more).
find "$LIB" -name '*.png' | awk -F/ -v n="$N" '{ split($NF, a, "."); if (a[1] + 0 >= n) print }' \
  | xargs -r rm -f

# Seconds of the best of three runs of a command, its output dropped.
best_of_3() {
  local best=""
  for _ in 1 2 3; do
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null
    t1=$(date +%s.%N)
    best=$(python3 -c "b='$best'; t=$t1-$t0; print(t if not b or t < float(b) else b)")
  done
  echo "$best"
}

if [ ! -f "$IDX.done" ]; then
  rm -rf "$IDX"
  t0=$(date +%s.%N)
  "$BIN" index "$LIB" --index "$IDX" --model "$MODEL" --json > target/bench/store/index-$NAME.log
  t1=$(date +%s.%N)
  INDEX_S=$(python3 -c "print($t1 - $t0)")
  touch "$IDX.done"
else
  INDEX_S=null
fi
REINDEX_S=$(best_of_3 "$BIN" reindex --index "$IDX" --json)
STATUS_S=$(best_of_3 "$BIN" status --index "$IDX" --json)
SEARCH_S=$(best_of_3 "$BIN" search "a photo of a shirt" --index "$IDX" --json -k 10)
"$BIN" status --index "$IDX" --json > target/bench/store/status-$NAME.json
python3 - "$N" "$INDEX_S" "$REINDEX_S" "$STATUS_S" "$SEARCH_S" "$OUT" "$MODEL" "$NAME" <<'PY'
import json, sys
n, index_s, reindex_s, status_s, search_s, out, model, name = sys.argv[1:]
status = json.load(open(f"target/bench/store/status-{name}.json"))
row = {
    "photos": int(n),
    "model": model,
    "indexed": status["photos"],
    "index_s": None if index_s == "null" else float(index_s),
    "reindex_unchanged_s": float(reindex_s),
    "status_s": float(status_s),
    "cold_search_s": float(search_s),
    "size_on_disk": status["size_on_disk"],
}
json.dump(row, open(out, "w"), indent=1)
print(json.dumps(row))
PY
