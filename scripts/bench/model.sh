#!/usr/bin/env bash
# clipdex against transformers' CLIPModel on the same random ViT-B/32
# checkpoint, same inputs, same thread count, measured in one run.
#   scripts/bench/model.sh            (THREADS=2 by default)
# Needs the reference venv: scripts/reference/setup-venv.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${THREADS:-2}
PY=${PYTHON:-.venv-ref/bin/python}
mkdir -p target/bench
cargo bench -j2 --bench model -- --threads "$THREADS" --json > target/bench/model-clipdex.json
"$PY" scripts/reference/bench_model.py --threads "$THREADS" --json 2>/dev/null > target/bench/model-torch.json
python3 - <<'PY'
import json
c = json.load(open("target/bench/model-clipdex.json"))
t = json.load(open("target/bench/model-torch.json"))
print(f"ViT-B/32, {c['threads']} threads; clipdex vs {t['impl']}")
print(f"{'':28}{'clipdex':>10}{'reference':>11}{'ratio':>8}")
for key, label, better in [("image_per_s_batch1", "images/s, batch 1", "higher"),
                           ("image_per_s_batch16", "images/s, batch 16", "higher"),
                           ("text_ms_p50", "10-token query, p50 ms", "lower"),
                           ("text_ms_p90", "10-token query, p90 ms", "lower")]:
    print(f"{label:28}{c[key]:10.2f}{t[key]:11.2f}{c[key] / t[key]:7.2f}x  ({better} is better)")
PY
