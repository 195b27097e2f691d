#!/usr/bin/env python3
"""A one-off text query from a cold process: clipdex (`clipdex embed
--text`) against ONNX Runtime, the strongest CPU peer (Immich runs CLIP on
it), on the same random ViT-B/32 checkpoint as `cargo bench --bench model`.

    .venv-ref/bin/python scripts/reference/bench_ort_start.py [--rounds 9] [--clipdex target/release/clipdex]

Each side starts a fresh process that loads what one query needs, embeds
the query and prints the unit vector:
- ONNX Runtime: imports `onnxruntime` and `tokenizers` (as Immich's
  machine-learning service does), opens the exported text tower (fp32, or
  `quantize_dynamic`'s int8 of it) with 2 threads and `ORT_ENABLE_ALL`,
  tokenizes with the checkpoint's `tokenizer.json`;
- clipdex: `embed --model DIR --precision P --text QUERY --json`.

The text towers are exported once into target/bench/ort-start (torch is
needed for that step only). Runs alternate round by round; the script
prints the median wall time and the largest peak resident set (`/usr/bin/time
-f %M`) of each, and the ratios exact / ORT fp32, fast / ORT int8 and
int8 / ORT int8.
"""

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "target/bench/vit-b-32"
OUT = ROOT / "target/bench/ort-start"
QUERY = "a photo of a dog on the beach"


def export():
    """The text tower as ONNX graphs (fp32 and int8) under OUT, made once."""
    fp32, int8 = OUT / "text.onnx", OUT / "text.int8.onnx"
    if fp32.exists() and int8.exists():
        return
    import torch
    from transformers import CLIPModel, CLIPTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_ort import Text, quantize

    OUT.mkdir(parents=True, exist_ok=True)
    model = CLIPModel.from_pretrained(MODEL, dtype=torch.float32).eval()
    ids = CLIPTokenizerFast.from_pretrained(MODEL)([QUERY], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.onnx.export(Text(model), (ids,), fp32, input_names=["ids"], output_names=["features"],
                          dynamic_axes={"ids": {0: "batch", 1: "seq"}}, dynamo=False, opset_version=17)
    quantize(fp32)


def one(kind):
    """One cold query through ONNX Runtime: what a fresh process needs, timed from outside."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = OUT / ("text.onnx" if kind == "fp32" else "text.int8.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ids = np.array([tokenizer.encode(QUERY).ids], dtype=np.int64)
    f = session.run(None, {"ids": ids})[0]
    print((f / np.linalg.norm(f, axis=-1, keepdims=True)).tolist())


def timed(command):
    """Wall seconds and peak resident MiB of one run of `command`."""
    import time

    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    return wall, int(done.stderr.strip().splitlines()[-1]) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--clipdex", default=str(ROOT / "target/release/clipdex"))
    ap.add_argument("--one", choices=["fp32", "int8"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one)
        return
    export()
    runs = {f"onnxruntime {kind}": [sys.executable, __file__, "--one", kind] for kind in ["fp32", "int8"]}
    for precision in ["exact", "fast", "int8"]:
        runs[f"clipdex {precision}"] = [args.clipdex, "embed", "--model", str(MODEL), "--precision", precision,
                                        "--text", QUERY, "--json"]
    walls = {name: [] for name in runs}
    peaks = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, command in runs.items():
            wall, peak = timed(command)
            walls[name].append(wall)
            peaks[name].append(peak)
    median = {name: statistics.median(w) for name, w in walls.items()}
    for name in runs:
        print(f"{name}: {median[name] * 1000:.0f} ms, peak {max(peaks[name]):.0f} MiB")
    for ours, theirs in [("exact", "fp32"), ("fast", "int8"), ("int8", "int8")]:
        a, b = f"clipdex {ours}", f"onnxruntime {theirs}"
        print(f"{ours} / ORT {theirs}: {median[a] / median[b]:.2f}x the time, "
              f"{max(peaks[a]) / max(peaks[b]):.2f}x the peak memory")


if __name__ == "__main__":
    main()
