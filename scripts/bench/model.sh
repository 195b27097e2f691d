#!/usr/bin/env bash
# clipdex against transformers' CLIPModel (or SiglipModel, or open_clip) on the same random
# checkpoint, same inputs, same thread count, measured in one run.
#   scripts/bench/model.sh            ViT-B/32 (THREADS=2 by default)
#   FAMILY=siglip scripts/bench/model.sh   SigLIP base-patch16-224
#   FAMILY=open_clip_rn50 scripts/bench/model.sh   open_clip's RN50 (the paper's ResNet) against open_clip
#   FAMILY=open_clip_xlmr scripts/bench/model.sh   open_clip's xlm-roberta-base-ViT-B-32 (multilingual) against open_clip
# Needs the reference venv: scripts/reference/setup-venv.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${THREADS:-2}
PY=${PYTHON:-.venv-ref/bin/python}
FAMILY=${FAMILY:-clip}
mkdir -p target/bench
if [ "$FAMILY" = siglip ]; then
  DIR=target/bench/siglip-b-16
  "$PY" scripts/reference/bench_model.py --family siglip --dir "$DIR" --prepare 2>/dev/null
elif [ "$FAMILY" = open_clip_rn50 ]; then
  DIR=target/bench/rn50
  "$PY" scripts/reference/bench_model.py --family open_clip_rn50 --dir "$DIR" --prepare 2>/dev/null
elif [ "$FAMILY" = open_clip_xlmr ]; then
  DIR=target/bench/xlmr-b-32
  "$PY" scripts/reference/bench_model.py --family open_clip_xlmr --dir "$DIR" --prepare 2>/dev/null
else
  DIR=target/bench/vit-b-32
fi
cargo bench -j2 --bench model -- --threads "$THREADS" --dir "$DIR" --json > target/bench/model-clipdex.json
"$PY" scripts/reference/bench_model.py --family "$FAMILY" --dir "$DIR" --threads "$THREADS" --json 2>/dev/null > target/bench/model-torch.json
python3 - <<'PY'
import json
c = json.load(open("target/bench/model-clipdex.json"))
t = json.load(open("target/bench/model-torch.json"))
print(f"{t['model']}, {c['threads']} threads; clipdex vs {t['impl']}")
print(f"{'':28}{'clipdex':>10}{'reference':>11}{'ratio':>8}")
for key, label, better in [("image_per_s_batch1", "images/s, batch 1", "higher"),
                           ("image_per_s_batch16", "images/s, batch 16", "higher"),
                           ("text_ms_p50", "8-word query, p50 ms", "lower"),
                           ("text_ms_p90", "8-word query, p90 ms", "lower")]:
    print(f"{label:28}{c[key]:10.2f}{t[key]:11.2f}{c[key] / t[key]:7.2f}x  ({better} is better)")
PY
