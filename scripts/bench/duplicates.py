#!/usr/bin/env python3
"""Duplicate groups on the shared photos: how well `clipdex duplicates` finds
edited copies of a photo without grouping different photos of one subject.

    .venv-light/bin/python scripts/bench/duplicates.py [--model DIR] [--thresholds 0.8,0.85,...]

Builds target/bench/duplicates/library once: every photo of
../shared/datasets/photos (GCompris and wallpapers, the large ones scaled
to 1600 px on the long side) plus five edited copies of each, the edits a
library collects: resized to 50%, re-encoded as JPEG quality 60, cropped 5%
on each side, rotated 3 degrees, colours tweaked (brightness +10%,
saturation -15%); deterministic. Indexes it with the model, then for each
threshold reads the groups (`clipdex duplicates --json`) and counts pairs:

- recall: pairs of one photo's family (the photo and its copies) grouped
  together, over all such pairs;
- precision: grouped pairs that are one family, over all grouped pairs;
- same-subject pairs grouped: pairs of different GCompris photos of one
  category (two fish) in one group, over all such pairs (the negatives).
"""

import argparse
import itertools
import json
from pathlib import Path

from PIL import Image, ImageEnhance

from clipdex_cli import ROOT, json_lines, run

PHOTOS = ROOT.parent / "shared" / "datasets" / "photos"
OUT = ROOT / "target" / "bench" / "duplicates"
EDITS = ["half", "q60", "crop5", "rot3", "colour"]


def edit(img, how):
    w, h = img.size
    if how == "half":
        return img.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS), {}
    if how == "q60":
        return img, {"quality": 60}
    if how == "crop5":
        return img.crop((w * 5 // 100, h * 5 // 100, w - w * 5 // 100, h - h * 5 // 100)), {}
    if how == "rot3":
        return img.rotate(3, resample=Image.BICUBIC, expand=False, fillcolor=(128, 128, 128)), {}
    if how == "colour":
        return ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.1)).enhance(0.85), {}
    raise ValueError(how)


def build():
    library = OUT / "library"
    done = OUT / "library.json"
    if done.exists():
        return library, json.loads(done.read_text())
    families = {}
    sources = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for n, src in enumerate(sources):
        rel = src.relative_to(PHOTOS)
        img = Image.open(src).convert("RGB")
        if max(img.size) > 1600:
            img.thumbnail((1600, 1600), Image.LANCZOS)
        stem = f"{rel.parent.as_posix().replace('/', '_')}_{src.stem}"
        original = f"originals/{stem}.jpg"
        (library / "originals").mkdir(parents=True, exist_ok=True)
        img.save(library / original, quality=95)
        members = [original]
        for how in EDITS:
            out, opts = edit(img, how)
            name = f"edited/{how}/{stem}.jpg"
            (library / "edited" / how).mkdir(parents=True, exist_ok=True)
            out.save(library / name, quality=opts.get("quality", 92))
            members.append(name)
        category = rel.parts[1] if rel.parts[0] == "gcompris" else None
        families[original] = {"members": members, "category": category}
    done.write_text(json.dumps(families, indent=1))
    return library, families



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "target" / "bench" / "gcompris" / "model"))
    ap.add_argument("--thresholds", default="0.8,0.85,0.9,0.92,0.94,0.95,0.96,0.97,0.98,0.99")
    args = ap.parse_args()
    library, families = build()
    family_of, category_of = {}, {}
    for original, f in families.items():
        for m in f["members"]:
            family_of[m] = original
            category_of[m] = f["category"]
    index = OUT / ("index-" + Path(args.model).name)
    run("index", library, "--index", index, "--model", args.model, "--precision", "exact")
    photos = list(family_of)
    true_pairs = sum(len(f["members"]) * (len(f["members"]) - 1) // 2 for f in families.values())
    negatives = sum(
        1 for a, b in itertools.combinations(photos, 2)
        if category_of[a] and category_of[a] == category_of[b] and family_of[a] != family_of[b]
    )
    print(f"model {args.model}: {len(families)} photos, {len(photos)} with their copies; "
          f"{true_pairs} family pairs, {negatives} same-subject pairs")
    print(f"{'threshold':>10}{'groups':>8}{'precision':>11}{'recall':>8}{'F1':>7}{'same-subject grouped':>22}")
    per_edit = {}
    for t in [float(x) for x in args.thresholds.split(",")]:
        groups = json_lines(run("duplicates", "--index", index, "--threshold", t, "--json"))
        grouped = right = wrong_subject = 0
        caught = {how: 0 for how in EDITS}
        for g in groups:
            paths = [p["path"] for p in g["photos"]]
            for a, b in itertools.combinations(paths, 2):
                grouped += 1
                if family_of[a] == family_of[b]:
                    right += 1
                    for how in EDITS:
                        if f"edited/{how}/" in a + b and ("originals/" in a + b):
                            caught[how] += 1
                elif category_of[a] and category_of[a] == category_of[b]:
                    wrong_subject += 1
        precision = right / grouped if grouped else 1.0
        recall = right / true_pairs
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_edit[t] = {how: caught[how] / len(families) for how in EDITS}
        print(f"{t:10.2f}{len(groups):8}{precision:11.3f}{recall:8.3f}{f1:7.3f}{wrong_subject / negatives:22.4f}")
    print("original-to-copy pairs found, by edit:")
    print(f"{'threshold':>10}" + "".join(f"{how:>8}" for how in EDITS))
    for t, shares in per_edit.items():
        print(f"{t:10.2f}" + "".join(f"{shares[how]:8.2f}" for how in EDITS))


if __name__ == "__main__":
    main()
