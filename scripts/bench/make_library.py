#!/usr/bin/env python3
"""Writes a photo library of N small distinct PNG files for the store-at-scale
benchmark (scripts/bench/store_scale.sh), from the Fashion-MNIST training
images in ../shared/datasets (never committed, never copied elsewhere).

    make_library.py DIR N

Photo i is training image i mod 60,000, tinted by the colour of round
i // 60,000 (so every file's content is different, as a real library's is),
at DIR/dNNN/dNN/i.png: 100 photos a folder, 100 folders a group. Files
already there are kept, so a smaller library grows into a larger one.
Deterministic: the same N gives the same bytes. Needs numpy and Pillow.
"""

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT.parent / "shared" / "datasets" / "fashion-mnist" / "train-images-idx3-ubyte.gz"


def images():
    with gzip.open(SOURCE, "rb") as f:
        data = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    assert magic == 2051, f"{SOURCE} is not an idx3 image file"
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)


def tint(round_):
    """The multiplier of each channel in round `round_` (round 0: grey)."""
    rng = np.random.default_rng(round_)
    return np.ones(3) if round_ == 0 else rng.uniform(0.35, 1.0, 3)


def main():
    out, n = Path(sys.argv[1]), int(sys.argv[2])
    grey = images()
    count = len(grey)
    written = 0
    for i in range(n):
        path = out / f"d{i // 10_000:03}" / f"d{i // 100 % 100:02}" / f"{i}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        g = grey[i % count].astype(np.float32)
        # Light background, dark garment, as a photo of one would be.
        rgb = (255.0 - g)[..., None] * tint(i // count)
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").save(path, optimize=False)
        written += 1
    print(f"{out}: {n} photos ({written} written)", file=sys.stderr)


if __name__ == "__main__":
    main()
