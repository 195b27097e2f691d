#!/usr/bin/env python3
"""The relevance cutoff on labelled queries: GCompris photos, their categories
as queries, a model trained here on them.

    .venv-light/bin/python scripts/train/prepare.py      # once: target/data/gcompris
    ./target/release/clipdex train --data target/data/gcompris/train.jsonl --val-percent 0 \
        --out target/bench/gcompris/model --config small-64 --epochs 50 --batch 64 --lr 5e-4 --seed 0
    .venv-light/bin/python scripts/bench/cutoff.py [--model DIR] [--cutoff auto]

Indexes ../shared/datasets/photos/gcompris (175 photos) into
target/bench/gcompris/index, then asks every query for all the photos with
`clipdex search --json --cutoff C --no-keywords` (meaning only: a file name
such as fish1.jpg would otherwise make its photo relevant by its words) and
counts, per query, the relevant photos (its category) marked relevant and the
others marked less relevant. Queries by a picture: every photo's `clipdex
similar`, its category as the relevant set. Prints the averages over all
photos and over the 34 the model never saw (target/data/gcompris/heldout.json).
"""

import argparse
import json
import sys
from pathlib import Path

from clipdex_cli import ROOT, json_lines, run

LIBRARY = ROOT.parent / "shared" / "datasets" / "photos" / "gcompris"
sys.path.insert(0, str(ROOT / "scripts" / "train"))
from prepare import GCOMPRIS_NOUNS  # noqa: E402

# The categories with more than one photo.
NOUNS = {c: n for c, n in GCOMPRIS_NOUNS.items() if c not in ("alphabets", "numbers")}




def score(rows, relevant, among):
    """(share of the relevant marked relevant, share of the others marked less)."""
    marked = {h["path"]: h["relevant"] for h in rows if h["path"] in among}
    rel = [marked.get(p, False) for p in among if p in relevant]
    irr = [not marked.get(p, False) for p in among if p not in relevant]
    keep = sum(rel) / len(rel) if rel else None
    drop = sum(irr) / len(irr) if irr else None
    return keep, drop


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "target" / "bench" / "gcompris" / "model"))
    ap.add_argument("--index", default=str(ROOT / "target" / "bench" / "gcompris" / "index"))
    ap.add_argument("--cutoff", default="auto")
    args = ap.parse_args()
    labels = json.load(open(LIBRARY / "labels.json"))
    held = {r["image"] for r in json.load(open(ROOT / "target" / "data" / "gcompris" / "heldout.json"))}
    category = {r["image"]: r["category"] for r in labels}
    run("index", LIBRARY, "--index", args.index, "--model", args.model, "--precision", "exact")
    everything = set(category)
    sets = {"all 175 photos": everything, f"the {len(held)} held out": held}
    k = len(labels) + 10
    results = {name: {"text": [], "image": []} for name in sets}
    for cat, noun in NOUNS.items():
        relevant = {p for p, c in category.items() if c == cat}
        for q in (noun, f"a photo of a {noun}"):
            rows = json_lines(run("search", q, "--index", args.index, "-k", k, "--json", "--no-keywords",
                            "--cutoff", args.cutoff))
            for name, among in sets.items():
                results[name]["text"].append((q,) + score(rows, relevant, among))
    ids = {h["path"]: h["id"] for h in json_lines(run("search", "a photo", "--index", args.index, "-k", k,
                                               "--json", "--no-keywords", "--cutoff", "none"))}
    for path, cat in category.items():
        if cat not in NOUNS:
            continue
        relevant = {p for p, c in category.items() if c == cat and p != path}
        rows = json_lines(run("similar", ids[path], "--index", args.index, "-k", k, "--json",
                        "--cutoff", args.cutoff))
        for name, among in sets.items():
            results[name]["image"].append((path,) + score(rows, relevant, among - {path}))
    print(f"cutoff={args.cutoff}, model {args.model}")
    print(f"{'':22}{'queries':>8}{'relevant kept':>15}{'worst query':>13}{'others below':>14}")
    for name in sets:
        for kind, label in (("text", "text (12)"), ("image", "by picture")):
            rows = results[name][kind]
            keeps = [r[1] for r in rows if r[1] is not None]
            print(f"{name + ', ' + kind:22}{len(rows):8}{mean(keeps):15.3f}{min(keeps):13.2f}"
                  f"{mean(r[2] for r in rows):14.3f}")
    print("per text query (all photos): " + ", ".join(
        f"{q!r} {a:.2f}/{b:.2f}" for q, a, b in results["all 175 photos"]["text"]))


if __name__ == "__main__":
    main()
