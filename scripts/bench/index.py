#!/usr/bin/env python3
"""Indexing speed and memory: `clipdex index` against a Python pipeline
(PIL + CLIPImageProcessor + CLIPModel), same photos, same ViT-B/32 weights,
same thread count, measured in one run.

    python3 scripts/bench/index.py [--library ../shared/datasets/photos] [--threads 2] [--rounds 3]
        [--precision exact|fast|int8] [--peer torch|ort|ort-int8]

`--peer ort` or `ort-int8` embeds the Python side with ONNX Runtime (fp32,
or its dynamic int8 quantization) instead of PyTorch: the same decoding
and preprocessing, the engine Immich runs (`bench_index.py --engine`).

With --rounds N, the two sides alternate N times (clipdex into a fresh index
each time); the table shows each side's fastest round, and every round's
ratio is printed too: on a shared host either side's time can vary by half.

Needs a release build (`cargo build --release`), the random ViT-B/32
checkpoint the model benchmark writes (`cargo bench --bench model` makes
target/bench/vit-b-32), and the reference venv (scripts/reference/setup-venv.sh).
Peak memory is each process's maximum resident set (wait4's ru_maxrss).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(cmd, env=None):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{cmd[0]} failed with status {status}")
    return json.loads(out.decode().strip().splitlines()[-1]), usage.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--library", default=os.path.join(ROOT, "..", "shared", "datasets", "photos"))
    ap.add_argument("--model", default=os.path.join(ROOT, "target", "bench", "vit-b-32"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv-ref", "bin", "python"))
    ap.add_argument("--exact-decode", action="store_true", help="clipdex decodes JPEGs at full size too")
    ap.add_argument("--precision", choices=["exact", "fast", "int8"], default="exact",
                    help="clipdex's --precision (fast: bf16 on AMX; int8: int8 on AMX)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate both sides this many times")
    ap.add_argument("--peer", choices=["torch", "ort", "ort-int8"], default="torch",
                    help="the Python side's engine: PyTorch, or ONNX Runtime fp32 or int8")
    args = ap.parse_args()
    binary = os.path.join(ROOT, "target", "release", "clipdex")
    if not os.path.exists(os.path.join(args.model, "model.safetensors")):
        sys.exit("no benchmark checkpoint: run `cargo bench --bench model` first")
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    python_cmd = [args.python, os.path.join(ROOT, "scripts", "reference", "bench_index.py"),
                  "--model", args.model, "--library", args.library, "--threads", str(args.threads),
                  "--engine", args.peer]
    rounds = []
    for _ in range(max(1, args.rounds)):
        with tempfile.TemporaryDirectory() as tmp:
            index = os.path.join(tmp, "index")
            cmd = [binary, "index", args.library, "--index", index, "--model", args.model, "--json",
                   "--threads", str(args.threads), "--workers", str(args.threads),
                   "--precision", args.precision]
            if args.exact_decode:
                cmd.append("--exact-decode")
            ours, ours_mem = run(cmd, env)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(index) for f in fs)
        theirs, theirs_mem = run(python_cmd)
        rounds.append((ours, ours_mem, theirs, theirs_mem))
    if len(rounds) > 1:
        for i, (o, _, t, _) in enumerate(rounds):
            print(f"round {i + 1}: clipdex {o['elapsed_seconds']:.2f} s, python {t['elapsed_seconds']:.2f} s, "
                  f"{t['elapsed_seconds'] / o['elapsed_seconds']:.2f}x")
    ours, ours_mem = min(((o, om) for o, om, _, _ in rounds), key=lambda r: r[0]["elapsed_seconds"])
    theirs, theirs_mem = min(((t, tm) for _, _, t, tm in rounds), key=lambda r: r[0]["elapsed_seconds"])
    n = ours["embedded"]
    m = theirs["files"]
    rows = [
        ("files", n, m),
        ("wall time, s", ours["elapsed_seconds"], theirs["elapsed_seconds"]),
        ("files/s, end to end", n / ours["elapsed_seconds"], m / theirs["elapsed_seconds"]),
        ("files/s, decode+preprocess (per worker-second)", n / ours["decode_seconds"], m / theirs["decode_seconds"]),
        ("files/s, embed", n / ours["embed_seconds"], m / theirs["embed_seconds"]),
        ("peak memory, MiB", ours_mem, theirs_mem),
    ]
    best = " (each side's fastest of %d rounds)" % len(rounds) if len(rounds) > 1 else ""
    print(f"indexing {args.library}: clipdex ({args.precision}) vs {theirs['impl']}, {args.threads} threads, ViT-B/32{best}")
    print(f"{'':48}{'clipdex':>10}{'python':>10}{'ratio':>8}")
    for label, a, b in rows:
        print(f"{label:48}{a:10.2f}{b:10.2f}{a / b:7.2f}x")
    print(f"clipdex index size on disk: {size / 2**20:.1f} MiB (thumbnails, store, graph, keywords)")


if __name__ == "__main__":
    main()
