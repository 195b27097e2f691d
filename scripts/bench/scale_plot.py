#!/usr/bin/env python3
"""The vector index from 100,000 to 1,000,000 photos, extrapolated to 10M.

Reads `cargo bench --bench scale -- run --json` results saved as
target/bench/scale/run-N.json (one per library size), fits build and query
times as a power of the size (a straight line on log-log axes) and memory
as a straight line (a fixed part, mostly the batch being inserted, plus a
part per photo), prints a table of the measured and the extrapolated
values, and draws them into benches/scale-extrapolation.png.

    for n in 100000 300000 1000000; do
      cargo bench --bench scale -- run --photos $n --json | tail -1 > target/bench/scale/run-$n.json
    done
    .venv-ref/bin/python scripts/bench/scale_plot.py

A power law grows faster than the logarithm an HNSW search is expected to
follow, so the query times it gives for 10M are an upper estimate while the
graph fits in memory.
"""

import glob
import json
import math
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
DATA = os.path.join(ROOT, "target", "bench", "scale")
PNG = os.path.join(ROOT, "benches", "scale-extrapolation.png")
TARGET = 10_000_000

MEASURES = [
    ("build_s", "build on 2 threads, s"),
    ("built_rss_mib", "memory of the graph, MiB"),
    ("text_p50_ms", "text query p50, ms (ef 64)"),
    ("image_p50_ms", "image query p50, ms (ef 64)"),
]


def fit(xs, ys):
    """Least squares of log y on log x: (exponent, y at x = 1)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    b = sum((a - mx) * (c - my) for a, c in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return b, math.exp(my - b * mx)


def linear(xs, ys):
    """Least squares of y on x: (per unit, at 0)."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((a - mx) * (c - my) for a, c in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return b, my - b * mx


def predict(key, fits, x):
    kind, (b, a) = fits[key]
    return a * x**b if kind == "power" else a + b * x


def main():
    runs = {}
    for path in glob.glob(os.path.join(DATA, "run-*.json")):
        n = int(re.search(r"run-(\d+)\.json", path).group(1))
        runs[n] = json.load(open(path))
    sizes = sorted(runs)
    if len(sizes) < 2:
        sys.exit("need run-N.json for at least two sizes (see the docstring)")
    print("| measure | " + " | ".join(f"{n:,}" for n in sizes) + f" | {TARGET:,} (fitted) | growth per 10x |")
    print("|---|" + "---|" * (len(sizes) + 2))
    fits = {}
    for key, label in MEASURES:
        ys = [runs[n][key] for n in sizes]
        fits[key] = ("linear", linear(sizes, ys)) if key == "built_rss_mib" else ("power", fit(sizes, ys))
        cells = " | ".join(f"{y:,.2f}" if y < 100 else f"{y:,.0f}" for y in ys)
        at = predict(key, fits, TARGET)
        growth = predict(key, fits, TARGET) / predict(key, fits, TARGET / 10)
        value = f"{at:,.2f}" if at < 100 else f"{at:,.0f}"
        print(f"| {label} | {cells} | {value} | {growth:.2f}x |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    grid = [sizes[0] * (TARGET / sizes[0]) ** (i / 50) for i in range(51)]
    panels = [
        (axes[0], ["build_s"], "build, s (2 threads)"),
        (axes[1], ["built_rss_mib"], "memory of the graph, MiB"),
        (axes[2], ["text_p50_ms", "image_p50_ms"], "query p50, ms (one thread, ef 64)"),
    ]
    for ax, keys, title in panels:
        for key in keys:
            label = dict(MEASURES)[key]
            growth = predict(key, fits, TARGET) / predict(key, fits, TARGET / 10)
            ax.plot(sizes, [runs[n][key] for n in sizes], "o", label=f"{label}, measured")
            ax.plot(grid, [predict(key, fits, x) for x in grid], "--",
                    label=f"{fits[key][0]} fit: x{growth:.2f} from 1M to 10M")
            ax.plot([TARGET], [predict(key, fits, TARGET)], "s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("photos")
        ax.set_title(title)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("clipdex's vector index (patched hnsw_rs, M 24, ef_construction 200), 512-d vectors")
    fig.tight_layout()
    fig.savefig(PNG, dpi=100)
    print(f"wrote {os.path.relpath(PNG, ROOT)}")


if __name__ == "__main__":
    main()
