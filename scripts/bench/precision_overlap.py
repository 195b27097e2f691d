#!/usr/bin/env python3
"""Ranking fidelity of `--precision fast`: the top-10 of 200 text queries
on an index made with fast against the same library indexed exact.

    python3 scripts/bench/precision_overlap.py [--photos 3000] [--precision fast|int8]
    python3 scripts/bench/precision_overlap.py --library DIR --model M [--precision fast|int8]

`--binary PATH` serves the reduced index with another build of clipdex (an
older one's queries against the same vectors).

The first form uses the benchmark library and indexes of `cargo bench
--bench server` (random ViT-B/32 weights; target/bench/index-N and
index-N-fast or -int8: run that bench once without and once with
`--precision fast` or `int8` first), with 200 varied queries. The second indexes a library of class
folders (such as target/data/fashion-mnist/test) with a trained model both
ways, once, under target/bench/overlap-*, and asks 200 queries made from
the class names. Starts `clipdex serve` on each index, sends the same
queries (meaning only, no keyword fusion) and prints the mean and smallest
overlap of the two top-10 lists.
"""

import argparse
import itertools
import json
import os
import random
import subprocess
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUBJECTS = ["a dog", "a cat", "a red car", "a windmill", "a fish", "a bicycle", "a mountain", "a child",
            "an old man", "a flower", "a boat", "a city street", "a forest", "a beach", "a bird", "a horse",
            "a tree", "a bridge", "a cake", "a guitar"]
SETTINGS = ["at night", "in the snow", "on a sunny day", "in black and white", "from above", "in the rain",
            "at sunset", "indoors", "close up", "in a painting"]


BINARY = os.path.join(ROOT, "target", "release", "clipdex")


def serve(index, binary=BINARY):
    proc = subprocess.Popen([binary, "serve", "--index", index, "--bind", "127.0.0.1:0", "--offline"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if line.startswith("clipdex is up at "):
            base = line.split("clipdex is up at ", 1)[1].strip()
            break
    else:
        raise SystemExit(f"clipdex serve {index} did not start")
    # Up means listening; the model and index load next.
    for _ in range(600):
        with urllib.request.urlopen(f"{base}/api/status") as r:
            if json.load(r)["state"] == "ready":
                return proc, base
        time.sleep(0.1)
    raise SystemExit(f"clipdex serve {index} did not get ready")


def top10(base, query):
    url = f"{base}/api/search?" + urllib.parse.urlencode({"q": query, "k": 10, "hybrid": "false"})
    with urllib.request.urlopen(url) as r:
        return [hit["path"] for hit in json.load(r)["hits"]]


PHRASES = ["a photo of a {}", "a picture of a {}", "an image of a {}", "a close-up photo of a {}",
           "a photo of the {}", "a good photo of a {}", "a low resolution photo of a {}", "a cropped photo of a {}",
           "a {}", "the {}", "my {}", "a small {}", "a large {}", "an old {}", "a new {}", "a dark {}",
           "a bright {}", "a black and white photo of a {}", "a blurry photo of a {}", "a {} on a white background"]


def index_both(library, model, reduced):
    """The library indexed with `model` exact and `reduced` (once): their folders."""
    binary = BINARY
    name = os.path.basename(os.path.normpath(model)) + "-" + os.path.basename(os.path.normpath(library))
    folders = []
    for precision in ("exact", reduced):
        index = os.path.join(ROOT, "target", "bench", f"overlap-{name}-{precision}")
        if not os.path.exists(os.path.join(index, ".complete")):
            subprocess.run([binary, "index", library, "--index", index, "--model", model,
                            "--precision", precision], check=True, stderr=subprocess.DEVNULL)
            open(os.path.join(index, ".complete"), "w").close()
        folders.append(index)
    return folders


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=3000)
    ap.add_argument("--library", help="a folder of class folders to index both ways")
    ap.add_argument("--model", help="the (trained) model to index it with")
    ap.add_argument("--precision", choices=["fast", "int8"], default="fast", help="the precision to compare with exact")
    ap.add_argument("--binary", default=BINARY, help="the clipdex that serves the reduced index (another build's)")
    args = ap.parse_args()
    if args.library:
        exact_index, fast_index = index_both(args.library, args.model, args.precision)
        classes = sorted(d for d in os.listdir(args.library) if os.path.isdir(os.path.join(args.library, d)))
        queries = [p.format(c) for c, p in itertools.product(classes, PHRASES)][:200]
        size = sum(len(fs) for _, _, fs in os.walk(args.library))
    else:
        exact_index = os.path.join(ROOT, "target", "bench", f"index-{args.photos}")
        fast_index = exact_index + "-" + args.precision
        queries = [f"{s} {t}" for s, t in itertools.product(SUBJECTS, SETTINGS)]
        random.Random(0).shuffle(queries)
        queries = queries[:200]
        size = args.photos
    servers = [serve(exact_index), serve(fast_index, args.binary)]
    try:
        overlaps = []
        for q in queries:
            a, b = (top10(base, q) for _, base in servers)
            overlaps.append(len(set(a) & set(b)) / 10)
    finally:
        for proc, _ in servers:
            proc.terminate()
    print(f"{len(queries)} queries, {size} photos: top-10 overlap {args.precision} vs exact: "
          f"mean {sum(overlaps) / len(overlaps):.3f}, smallest {min(overlaps):.1f}, "
          f"identical lists {sum(o == 1.0 for o in overlaps)}")


if __name__ == "__main__":
    main()
