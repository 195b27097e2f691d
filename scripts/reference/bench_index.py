#!/usr/bin/env python3
"""A Python indexing pipeline, for `scripts/bench/index.py` to compare with `clipdex index`.

PIL decodes each file, transformers' CLIPImageProcessor (the default,
torchvision-backed) preprocesses batches of 16, and CLIPModel embeds them,
as a straightforward Python indexer (clip-retrieval, rclip) does. Prints one
JSON line: files, seconds spent decoding+preprocessing and embedding, wall time.

    python scripts/reference/bench_index.py --model DIR --library DIR [--threads 2] [--engine torch|ort|ort-int8]

`--engine ort` embeds with ONNX Runtime instead (the engine Immich runs),
on the vision tower exported as `bench_ort.py` exports it (opset 17,
ORT_ENABLE_ALL); `ort-int8` on that graph after `quantize_dynamic`
(per-channel int8 weights). The export is done before the clock starts,
as a user of such a tool downloads an exported model; loading the
session is timed.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

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
    ap.add_argument("--engine", choices=["torch", "ort", "ort-int8"], default="torch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export(args.model, Path(tmp), args.engine == "ort-int8") if args.engine != "torch" else None
        run(args, onnx)


def export(model_dir, tmp, int8):
    """The vision tower as an ONNX graph (int8: after quantize_dynamic), as bench_ort.py makes it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ort import export_image, quantize

    model = CLIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    path = tmp / "image.onnx"
    with torch.no_grad():
        export_image(model, model.config.vision_config.image_size, path)
    return quantize(path) if int8 else path


def run(args, onnx):
    start = time.perf_counter()
    if onnx is None:
        model = CLIPModel.from_pretrained(args.model, dtype=torch.float32).eval()
        embed_batch = lambda pixels: model.get_image_features(pixel_values=pixels)
        impl = "PIL + CLIPImageProcessor + CLIPModel (torch %s)" % torch.__version__
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
        embed_batch = lambda pixels: session.run(None, {"pixels": pixels.numpy()})
        impl = "PIL + CLIPImageProcessor + onnxruntime %s %s" % (
            ort.__version__, "int8" if args.engine == "ort-int8" else "fp32")
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
            if len(images):
                embed_batch(pixels)
            embed += time.perf_counter() - t
            n += len(images)
    print(json.dumps({
        "impl": impl,
        "files": n,
        "decode_seconds": decode,
        "embed_seconds": embed,
        "elapsed_seconds": time.perf_counter() - start,
    }))


if __name__ == "__main__":
    main()
