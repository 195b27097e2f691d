#!/usr/bin/env python3
"""A Python indexing pipeline, for `scripts/bench/index.py` to compare with `clipdex index`.

PIL decodes each file, transformers' CLIPImageProcessor (the default,
torchvision-backed) preprocesses batches of 16, and CLIPModel embeds them,
as a straightforward Python indexer (clip-retrieval, rclip) does. Prints one
JSON line: files, seconds spent decoding+preprocessing and embedding, wall time.

    python scripts/reference/bench_index.py --model DIR --library DIR [--threads 2]
"""

import argparse
import json
import os
import time

import torch
from PIL import Image, ImageOps
from transformers import CLIPImageProcessor, CLIPModel

EXTS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def files(root):
    for dirpath, _, names in os.walk(root):
        for n in sorted(names):
            if os.path.splitext(n)[1].lower() in EXTS:
                yield os.path.join(dirpath, n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--library", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = CLIPModel.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = CLIPImageProcessor()  # CLIP defaults: 224 px, OpenAI mean and std
    paths = sorted(files(args.library))
    decode = embed = 0.0
    n = 0
    with torch.inference_mode():
        for i in range(0, len(paths), args.batch):
            t = time.perf_counter()
            images = []
            for p in paths[i : i + args.batch]:
                try:
                    images.append(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
                except Exception:
                    pass
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            decode += time.perf_counter() - t
            t = time.perf_counter()
            model.get_image_features(pixel_values=pixels)
            embed += time.perf_counter() - t
            n += len(images)
    print(json.dumps({
        "impl": "PIL + CLIPImageProcessor + CLIPModel (torch %s)" % torch.__version__,
        "files": n,
        "decode_seconds": decode,
        "embed_seconds": embed,
        "elapsed_seconds": time.perf_counter() - start,
    }))


if __name__ == "__main__":
    main()
