#!/usr/bin/env python3
"""Automatic tags on labelled photos: GCompris, each photo's name and category
as its true tags, a model trained here on them.

    .venv-light/bin/python scripts/train/prepare.py      # once: target/data/gcompris
    ./target/release/clipdex train --data target/data/gcompris/train.jsonl --val-percent 0 \\
        --out target/bench/gcompris/model --config small-64 --epochs 50 --batch 64 --lr 5e-4 --seed 0
    .venv-light/bin/python scripts/bench/tags.py [--contrast] [--threshold 0.1]

Indexes ../shared/datasets/photos/gcompris (175 photos) into
target/bench/gcompris/index with the model, writes a vocabulary of the
photos' names and categories (target/bench/gcompris/tags.txt: 100 tags,
each name a kind of its category, "a photo of a {}." as the captions the
model trained on), re-tags the index with it
at a probability of 0.001 (`clipdex retag`), reads every photo's tags and
probabilities back (`clipdex search --json`), and prints precision and
recall of the tags a threshold keeps, over all photos and over the 34 the
model never saw (target/data/gcompris/heldout.json). `--contrast` adds
contrast classes to the vocabulary, `--flat` leaves out the "<" kinds. The
37 wallpapers (landscapes, cities: nothing the vocabulary names) are
indexed and tagged the same way, to count the tags given where none is
right. Finally re-tags at `--threshold` and
checks that the index gives exactly the tags the sweep predicts there.
"""

import argparse
import json
import sys
from pathlib import Path

from clipdex_cli import ROOT, json_lines, run

LIBRARY = ROOT.parent / "shared" / "datasets" / "photos" / "gcompris"
sys.path.insert(0, str(ROOT / "scripts" / "train"))
from prepare import GCOMPRIS_NOUNS, words  # noqa: E402

THRESHOLDS = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]



def truth(row):
    return {words(row["name"]), GCOMPRIS_NOUNS[row["category"]]}


def read_tags(index, k):
    """Every photo's tags: {path: {name: probability}}."""
    out = run("search", "tag", "--index", index, "-k", k, "--json", "--no-keywords", "--cutoff", "none")
    rows = json_lines(out)
    return {h["path"]: {t["name"]: t["probability"] for t in h["tags"]} for h in rows}


def scores(tags, labels, among, threshold):
    """(micro precision, micro recall, photos with every true tag, mean tags per photo)."""
    given = right = wanted = complete = 0
    for path in among:
        kept = {n for n, p in tags.get(path, {}).items() if p >= threshold}
        true = labels[path]
        given += len(kept)
        right += len(kept & true)
        wanted += len(true)
        complete += true <= kept
    n = len(among)
    return right / max(given, 1), right / max(wanted, 1), complete / n, given / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "target" / "bench" / "gcompris" / "model"))
    ap.add_argument("--index", default=str(ROOT / "target" / "bench" / "gcompris" / "index"))
    ap.add_argument("--contrast", action="store_true", help="add contrast classes")
    ap.add_argument("--flat", action="store_true", help="no name < category")
    ap.add_argument("--threshold", type=float, default=0.3, help="the threshold checked at the end (the default)")
    args = ap.parse_args()
    rows = json.load(open(LIBRARY / "labels.json"))
    held = {r["image"] for r in json.load(open(ROOT / "target" / "data" / "gcompris" / "heldout.json"))}
    labels = {r["image"]: truth(r) for r in rows}
    nouns = sorted(set(GCOMPRIS_NOUNS.values()))
    names = sorted({words(r["name"]): GCOMPRIS_NOUNS[r["category"]] for r in rows}.items())
    lines = ["# GCompris names and categories", "template: a photo of a {}."]
    if args.contrast:
        lines += ["- thing", "- object | picture"]
    lines += nouns
    for name, noun in names:
        if name not in nouns:
            lines.append(name if args.flat else f"{name} < {noun}")
    vocab = nouns + [n for n, _ in names if n not in nouns]
    vocab_file = Path(args.index).parent / "tags.txt"
    vocab_file.write_text("\n".join(lines) + "\n")
    run("index", LIBRARY, "--index", args.index, "--model", args.model, "--precision", "exact")
    run("retag", "--index", args.index, "--tags", vocab_file, "--tag-threshold", "0.001")
    tags = read_tags(args.index, len(rows) + 10)
    print(f"{len(vocab)} tags, {len(rows)} photos, 2 true tags each (name and category; 1 where they are one word)")
    print("threshold | all 175: precision recall complete tags/photo | 34 held out: precision recall complete")
    for t in THRESHOLDS:
        a = scores(tags, labels, list(labels), t)
        h = scores(tags, labels, sorted(held), t)
        print(f"{t:9.2f} | {a[0]:.3f} {a[1]:.3f} {a[2]:.3f} {a[3]:.2f} | {h[0]:.3f} {h[1]:.3f} {h[2]:.3f}")
    # Photos of nothing the vocabulary lists (the wallpapers: landscapes,
    # cities): each tag they get is wrong.
    others = ROOT.parent / "shared" / "datasets" / "photos" / "wallpapers"
    other_index = Path(args.index).parent / "index-wallpapers"
    run("index", others, "--index", other_index, "--model", args.model, "--precision", "exact")
    run("retag", "--index", other_index, "--tags", vocab_file, "--tag-threshold", "0.001")
    wrong = read_tags(other_index, 100)
    given = [sum(1 for p in t.values() if p >= args.threshold) for t in wrong.values()]
    print(f"{len(wrong)} wallpapers (nothing of the vocabulary) at {args.threshold}: "
          f"{sum(1 for g in given if g)} get a tag, {sum(given) / len(given):.2f} tags each")
    # The index at the threshold gives what the sweep says.
    run("retag", "--index", args.index, "--tags", vocab_file, "--tag-threshold", args.threshold)
    after = read_tags(args.index, len(rows) + 10)
    expected = {p: {n for n, q in t.items() if q >= args.threshold} for p, t in tags.items()}
    got = {p: set(t) for p, t in after.items()}
    mismatched = [p for p in expected if expected[p] != got.get(p, set())]
    print(f"at {args.threshold}: the index's tags match the sweep for {len(expected) - len(mismatched)} of {len(expected)} photos")


if __name__ == "__main__":
    main()
