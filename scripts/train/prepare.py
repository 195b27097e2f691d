#!/usr/bin/env python3
"""Writes the training comparison's datasets under target/data/ from ../shared/datasets.

  fashion-mnist/train/<class>/<n>.png, test/<class>/<n>.png
  fashion-mnist/train.jsonl + train.csv   the 60,000 training images with captions made
                                          from the class name and CLIP-style templates
  fashion-mnist/templates.txt             those templates, for the zero-shot classifiers
  tuxpaint/images/...                     the Tux Paint stamps composited onto white
  tuxpaint/train.jsonl + .csv, val.jsonl + .csv
                                          a deterministic 80/20 split (hash of the path)
  gcompris/train.jsonl + .csv             the GCompris photos' deterministic 80% (hash of
                                          the path), four captions each from the name and
                                          category of labels.json, plus Tux Paint's train
                                          rows for a wider vocabulary
  gcompris/heldout.json                   the other 20%: [{"image", "category", "name"}]

clipdex reads the JSONL files, open_clip the CSV files (filepath, title): the
same rows, the same captions. Needs numpy and Pillow (the reference venv).

    .venv-ref/bin/python scripts/train/prepare.py
"""

import gzip
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "datasets"
OUT = ROOT / "target" / "data"

# Fashion-MNIST classes, in label order, as folder names (class_name() turns
# "-" and "_" into spaces: "ankle boot", "t shirt").
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
]


def class_name(folder):
    return " ".join(folder.replace("-", " ").replace("_", " ").split())


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    return np.frombuffer(data, dtype=np.uint8, offset=8)


def write_pairs(rows, stem):
    with open(f"{stem}.jsonl", "w") as j, open(f"{stem}.csv", "w") as c:
        c.write("filepath\ttitle\n")
        for image, caption in rows:
            j.write(json.dumps({"image": str(image), "caption": caption}) + "\n")
            c.write(f"{image}\t{caption}\n")


def fashion_mnist():
    out = OUT / "fashion-mnist"
    out.mkdir(parents=True, exist_ok=True)
    # The captions' templates, for both sides' zero-shot classifiers.
    (out / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    if (out / "train.jsonl").exists():
        return
    src = SHARED / "fashion-mnist"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = idx(src / f"{prefix}-images-idx3-ubyte.gz")
        labels = idx(src / f"{prefix}-labels-idx1-ubyte.gz")
        rows = []
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = out / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:05d}.png"
            Image.fromarray(img, mode="L").save(path)
            caption = TEMPLATES[i % len(TEMPLATES)].format(class_name(CLASSES[label]))
            rows.append((path, caption))
        if split == "train":
            write_pairs(rows, out / "train")
    print(f"fashion-mnist: {out}")


def tuxpaint():
    out = OUT / "tuxpaint"
    if (out / "train.jsonl").exists():
        return
    src = SHARED / "tuxpaint"
    train, val = [], []
    for line in open(src / "pairs.jsonl"):
        row = json.loads(line)
        rel = row["image"]
        dst = (out / rel).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        img = Image.open(src / rel).convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        Image.alpha_composite(white, img).convert("RGB").save(dst)
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100
        (val if bucket < 20 else train).append((dst, row["caption"]))
    write_pairs(train, out / "train")
    write_pairs(val, out / "val")
    print(f"tuxpaint: {len(train)} train, {len(val)} val pairs in {out}")


# What a GCompris category is called in a caption (and in a query).
GCOMPRIS_NOUNS = {
    "fishes": "fish",
    "erase_animals": "animal",
    "tools": "tool",
    "monuments": "monument",
    "renewable": "renewable energy plant",
    "others": "household object",
    "alphabets": "alphabet",
    "numbers": "number",
}


def words(name):
    """'measuringTape' -> 'measuring tape', 'red_panda' -> 'red panda'."""
    out = []
    for ch in name.replace("_", " "):
        if ch.isupper() and out and out[-1] != " ":
            out.append(" ")
        out.append(ch.lower())
    return " ".join("".join(out).split())


def gcompris():
    out = OUT / "gcompris"
    if (out / "train.jsonl").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    src = SHARED / "photos" / "gcompris"
    rows, held = [], []
    for row in json.load(open(src / "labels.json")):
        rel = row["image"]
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100
        if bucket < 20:
            held.append({"image": rel, "category": row["category"], "name": row["name"]})
            continue
        name, noun = words(row["name"]), GCOMPRIS_NOUNS[row["category"]]
        for caption in (
            f"a photo of a {name}.",
            f"a photo of a {noun}.",
            f"a picture of a {name}, a {noun}.",
            f"a {noun}: {name}.",
        ):
            rows.append((src / rel, caption))
    tux = [line.split("\t", 1) for line in open(OUT / "tuxpaint" / "train.csv").read().splitlines()[1:]]
    rows += [(Path(image), caption) for image, caption in tux]
    write_pairs(rows, out / "train")
    (out / "heldout.json").write_text(json.dumps(held, indent=1) + "\n")
    print(f"gcompris: {len(rows)} train rows, {len(held)} held-out photos in {out}")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    fashion_mnist()
    tuxpaint()
    gcompris()
