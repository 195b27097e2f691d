#!/usr/bin/env bash
# clipdex exact, fast (bf16) and int8 against ONNX Runtime fp32 and dynamic
# int8 on the same random checkpoint and inputs, 2 threads each, in one run:
# clipdex's three precisions, then ONNX Runtime, then clipdex's again; the
# ratios use the medians of each side's runs (with two, their mean).
# ROUNDS=N (default 1) alternates N times (clipdex, ONNX Runtime, ...,
# clipdex): this host's minutes swing either side by 1.4x, ONNX Runtime's
# int8 query from 4.1 to 7.2 ms within ten minutes (2026-12-04).
#   [ROUNDS=3] scripts/bench/precision_ort.sh [clip|siglip|open_clip_rn50|open_clip_xlmr]
# The checkpoint folders are those of scripts/bench/model.sh (FAMILY=...).
# Needs the reference venv: scripts/reference/setup-venv.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
FAMILY=${1:-clip}
THREADS=${THREADS:-2}
PY=${PYTHON:-.venv-ref/bin/python}
case "$FAMILY" in
  clip) DIR=target/bench/vit-b-32 ;;
  siglip) DIR=target/bench/siglip-b-16 ;;
  open_clip_rn50) DIR=target/bench/rn50 ;;
  open_clip_xlmr) DIR=target/bench/xlmr-b-32 ;;
  *) echo "unknown family $FAMILY" >&2; exit 2 ;;
esac
cargo bench -j2 --bench model --no-run 2>/dev/null
BIN=$(ls -t target/release/deps/model-* | grep -v '\.d$' | head -1)
OUT=target/bench/precision-ort-$FAMILY.jsonl
: > "$OUT"
clipdex() {
  for p in exact fast int8; do
    "$BIN" --bench --threads "$THREADS" --dir "$DIR" --precision "$p" --json | tail -1 >> "$OUT"
  done
}
for _ in $(seq "${ROUNDS:-1}"); do
  clipdex
  "$PY" scripts/reference/bench_ort.py --family "$FAMILY" --dir "$DIR" --threads "$THREADS" --int8 --json \
    2>/dev/null | grep '^{' >> "$OUT"
done
clipdex
python3 - "$OUT" "$DIR" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
runs = {}
for r in rows:
    key = r["precision"] if r["impl"] == "clipdex" else "ort-" + r["impl"].split()[-1]
    runs.setdefault(key, []).append(r)
def median(key, field):
    xs = sorted(r[field] for r in runs[key])
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2
print(f"{sys.argv[2]}, {rows[0]['threads']} threads (medians of {len(runs['exact'])} clipdex runs "
      f"and {len(runs['ort-int8'])} ONNX Runtime runs, alternated)")
fields = [("image_per_s_batch1", "images/s, batch 1", True), ("image_per_s_batch16", "images/s, batch 16", True),
          ("text_ms_p50", "query p50 ms", False), ("texts32_ms_p50", "32 mixed queries p50 ms", False)]
print("| | clipdex exact | fast | int8 | ORT fp32 | ORT int8 | exact / fp32 | fast / int8 | int8 / int8 |")
print("|---|---|---|---|---|---|---|---|---|")
for field, label, higher in fields:
    if any(field not in r for r in rows):
        continue
    e, f, i = (median(k, field) for k in ("exact", "fast", "int8"))
    of, oi = median("ort-fp32", field), median("ort-int8", field)
    # images/s over images/s (above 1: clipdex faster), ms over ms (below 1: clipdex faster).
    ratio = lambda a, b: a / b
    print(f"| {label} | {e:.2f} | {f:.2f} | {i:.2f} | {of:.2f} | {oi:.2f} "
          f"| {ratio(e, of):.2f}x | {ratio(f, oi):.2f}x | {ratio(i, oi):.2f}x |")
print("Each run, in order:")
for key in ("exact", "fast", "int8", "ort-fp32", "ort-int8"):
    print(f"  {key}: " + "; ".join(" / ".join(f"{r[f]:.2f}" for f, _, _ in fields if f in r) for r in runs[key])
          + " (" + " / ".join(label for f, label, _ in fields if f in runs[key][0]) + ")")
for key in ("fast", "int8"):
    fid = runs[key][0].get("fidelity") or {}
    print(f"clipdex {key} against exact: smallest cosine {fid['random_image_cosine_min']:.6f} "
          f"(16 random images), {fid['random_text_cosine_min']:.6f} (2 texts)")
print(f"ONNX Runtime int8 against its fp32: smallest cosine {runs['ort-int8'][0]['min_cosine_to_fp32']:.6f} (16 random images)")
PY
