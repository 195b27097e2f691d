#!/usr/bin/env bash
# Per-layer table of `--precision fast` (or PRECISION=int8): each kind of
# dense layer alone in bf16 (int8) the rest f32, then the default set, then
# the default set plus the final projections; smallest and mean cosine to
# exact on every picture under PHOTOS and 20 captions, and the speed of each
# setting.
#   [PRECISION=int8] scripts/bench/precision_layers.sh [MODEL_DIR] [PHOTOS]
# MODEL_DIR: a checkpoint folder (default: the random ViT-B/32 of
# `cargo bench --bench model`); PHOTOS: default ../shared/datasets/photos.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-target/bench/vit-b-32}
PHOTOS=${2:-../shared/datasets/photos}
THREADS=${THREADS:-2}
PRECISION=${PRECISION:-fast}
cargo bench -j2 --bench model --no-run 2>/dev/null
BIN=$(ls -t target/release/deps/model-* | grep -v '\.d$' | head -1)
OUT=target/bench/precision-layers-$PRECISION.jsonl
: > "$OUT"
run() {
  "$BIN" --bench --threads "$THREADS" --dir "$DIR" --photos "$PHOTOS" --json --precision "$PRECISION" --layers "$1" \
    | tail -1 >> "$OUT"
}
"$BIN" --bench --threads "$THREADS" --dir "$DIR" --json | tail -1 >> "$OUT"
for kinds in patch qkv attn-out mlp-up mlp-down conv projection \
  patch,qkv,attn-out,mlp-up,mlp-down,conv patch,qkv,attn-out,mlp-up,mlp-down,conv,projection; do
  run "$kinds"
done
python3 - "$OUT" "$DIR" "$PRECISION" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{sys.argv[2]}, {rows[0]['threads']} threads")
print(f"| layers in {'bf16' if sys.argv[3] == 'fast' else 'int8'} | photos: min cosine | mean | captions: min | mean | images/s b1 | b16 | query ms |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    f = r.get("fidelity") or {}
    name = r.get("layers") or "none (exact)"
    if name == "patch,qkv,attn-out,mlp-up,mlp-down,conv": name = "default (all but projection)"
    if name.endswith(",projection") : name = "default + projection"
    cell = lambda k, d: f"{f[k]:.{d}f}" if k in f else "1"
    print(f"| {name} | {cell('photo_cosine_min', 6)} | {cell('photo_cosine_mean', 7)} | {cell('text_cosine_min', 6)} | {cell('text_cosine_mean', 7)} "
          f"| {r['image_per_s_batch1']:.1f} | {r['image_per_s_batch16']:.1f} | {r['text_ms_p50']:.2f} |")
PY
