#!/usr/bin/env bash
# clipdex's vector index against hnswlib on the scale benchmark's vectors
# (scripts/bench/scale_data.sh makes them once), in one run: clipdex first
# (it writes the exact top-10 lists), then hnswlib with the same M and
# ef_construction, then the ratios at the smallest ef where each side
# reaches recall@10 >= 0.95 on both text and image queries.
#   scripts/bench/scale.sh [N]        # N photos, default 1,000,000
# Needs the reference venv with hnswlib (scripts/reference/setup-venv.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-1000000}
PY=${PYTHON:-.venv-ref/bin/python}
THREADS=${THREADS:-2}
DATA=target/bench/scale
OUT=$DATA/result-$N.jsonl
cargo bench -j2 --bench scale --no-run 2>/dev/null
BIN=$(ls -t target/release/deps/scale-* | grep -v '\.d$' | head -1)
: > "$OUT"
RAYON_NUM_THREADS=$THREADS "$BIN" run --data "$DATA" --photos "$N" --json | tail -1 >> "$OUT"
"$PY" scripts/reference/bench_hnswlib.py --data "$DATA" --photos "$N" --threads "$THREADS" --json | tail -1 >> "$OUT"
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
c, h = rows
def at_recall(r, bar=0.95):
    ok = [s for s in r["sweep"] if s["text_recall"] >= bar and s["image_recall"] >= bar]
    return ok[0] if ok else None
print(f"{c['photos']:,} photos x 512, build on {c['threads']} threads, queries on one")
print(f"{'':34}{'clipdex':>12}{'hnswlib':>12}{'ratio':>8}")
def row(label, a, b, fmt="{:.1f}", better_low=True):
    if a is None or b is None:
        print(f"{label:34}{'-':>12}{'-':>12}"); return
    ratio = b / a if better_low else a / b
    print(f"{label:34}{fmt.format(a):>12}{fmt.format(b):>12}{ratio:7.2f}x")
row("build, s", c["build_s"], h["build_s"])
row("save, s", c["save_s"], h["save_s"], "{:.2f}")
row("load, s", c["load_s"], h["load_s"], "{:.2f}")
row("add 10,000, s", c.get("add_10000_s"), h.get("add_10000_s"), "{:.2f}")
row("resident after build, MiB", c["built_rss_mib"], h["built_rss_mib"], "{:.0f}")
row("on disk, MiB", c["disk_mib"], h["disk_mib"], "{:.0f}")
print(f"default settings: clipdex recall@10 text {c['text_recall']:.4f}, image {c['image_recall']:.4f}, "
      f"{c['text_qps']:.0f} / {c['image_qps']:.0f} queries/s")
ca, ha = at_recall(c), at_recall(h)
if ca and ha:
    print(f"at recall@10 >= 0.95 (clipdex ef {ca['ef']}, hnswlib ef {ha['ef']}):")
    row("  text queries/s", ca["text_qps"], ha["text_qps"], "{:.0f}", better_low=False)
    row("  image queries/s", ca["image_qps"], ha["image_qps"], "{:.0f}", better_low=False)
def qps_at(r, key, target):
    """Queries/s at recall `target`, interpolated (log-linear) between the
    sweep's two neighbouring ef; None outside the sweep."""
    import math
    pts = [(s[key + "_recall"], s[key + "_qps"]) for s in r["sweep"]]
    for (r0, q0), (r1, q1) in zip(pts, pts[1:]):
        if r0 < target <= r1:
            t = (target - r0) / (r1 - r0)
            return math.exp(math.log(q0) + t * (math.log(q1) - math.log(q0)))
    return None
print("single-thread queries/s at equal recall@10 (interpolated between swept ef):")
for key in ["text", "image"]:
    for target in [0.95, 0.97, 0.98, 0.99, 0.995]:
        row(f"  {key}, recall {target}", qps_at(c, key, target), qps_at(h, key, target), "{:.0f}", better_low=False)
for label, key in [("text", "text"), ("image", "image")]:
    print(f"{label} recall / queries/s by ef:")
    for a, b in zip(c["sweep"], h["sweep"]):
        print(f"  ef {a['ef']:4}: clipdex {a[key + '_recall']:.4f} {a[key + '_qps']:7.0f}/s   "
              f"hnswlib {b[key + '_recall']:.4f} {b[key + '_qps']:7.0f}/s   {a[key + '_qps'] / b[key + '_qps']:.2f}x")
PY
