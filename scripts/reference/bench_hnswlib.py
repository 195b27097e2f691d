#!/usr/bin/env python3
"""hnswlib on the scale benchmark's vectors, as `cargo bench --bench scale -- run`
measures clipdex: build on THREADS threads, save and load, recall@10 of the
text and image queries against the exact lists that run wrote
(DIR/truth-N.u32), single-thread queries/s over a sweep of ef, and adding
10,000 more vectors. Photo index i has id i + 1 on both sides.

    .venv-ref/bin/python scripts/reference/bench_hnswlib.py --data target/bench/scale --photos N [--json]
"""

import argparse
import json
import os
import tempfile
import time

import hnswlib
import numpy as np

DIM = 512
K = 10


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def vectors(path, start=0, count=None):
    total = os.path.getsize(path) // (4 * DIM)
    count = total - start if count is None else count
    assert start + count <= total, f"{path} holds {total} vectors, {start + count} wanted"
    return np.fromfile(path, dtype="<f4", count=count * DIM, offset=start * DIM * 4).reshape(count, DIM)


def recall_and_qps(index, queries, truth):
    index.set_num_threads(1)
    start = time.perf_counter()
    labels, _ = index.knn_query(queries, k=K)
    seconds = time.perf_counter() - start
    hits = sum(len(set(l.tolist()) & set((t + 1).tolist())) for l, t in zip(labels, truth))
    return hits / (len(truth) * K), len(truth) / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="target/bench/scale")
    ap.add_argument("--photos", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--M", type=int, default=24)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    n = a.photos
    photos = vectors(os.path.join(a.data, "photos.f32"), 0, n)
    text = vectors(os.path.join(a.data, "text-queries.f32"))
    image_total = os.path.getsize(os.path.join(a.data, "image-queries.f32")) // (4 * DIM)
    image = vectors(os.path.join(a.data, "image-queries.f32"), 0, min(a.queries, image_total))
    truth = np.fromfile(os.path.join(a.data, f"truth-{n}.u32"), dtype="<u4").reshape(-1, K).astype(np.int64)
    assert len(truth) == len(text) + len(image), "truth-N.u32 is for other queries: run the clipdex side first"
    text_truth, image_truth = truth[: len(text)], truth[len(text):]
    total = os.path.getsize(os.path.join(a.data, "photos.f32")) // (4 * DIM)
    extra = vectors(os.path.join(a.data, "photos.f32"), n, 10_000) if total >= n + 10_000 else None

    before = rss_mib()
    index = hnswlib.Index(space="ip", dim=DIM)
    index.init_index(max_elements=n + 10_000, M=a.M, ef_construction=a.ef_construction, random_seed=0)
    index.set_num_threads(a.threads)
    start = time.perf_counter()
    index.add_items(photos, np.arange(1, n + 1))
    build = time.perf_counter() - start
    rss = rss_mib() - before
    with tempfile.TemporaryDirectory(dir=a.data) as tmp:
        path = os.path.join(tmp, "hnswlib.bin")
        start = time.perf_counter()
        index.save_index(path)
        save = time.perf_counter() - start
        disk = os.path.getsize(path) / (1 << 20)
        del index
        start = time.perf_counter()
        index = hnswlib.Index(space="ip", dim=DIM)
        index.load_index(path, max_elements=n + 10_000)
        load = time.perf_counter() - start

    sweep = []
    for ef in [16, 32, 48, 64, 96, 128, 192, 256]:
        index.set_ef(ef)
        tr, tq = recall_and_qps(index, text, text_truth)
        ir, iq = recall_and_qps(index, image, image_truth)
        sweep.append({"ef": ef, "text_recall": tr, "text_qps": tq, "image_recall": ir, "image_qps": iq})
    add = None
    if extra is not None:
        index.set_num_threads(a.threads)
        start = time.perf_counter()
        index.add_items(extra, np.arange(n + 1, n + 10_001))
        add = time.perf_counter() - start
    result = {
        "impl": f"hnswlib {hnswlib.__version__ if hasattr(hnswlib, '__version__') else ''}".strip(),
        "photos": n, "threads": a.threads, "M": a.M, "ef_construction": a.ef_construction,
        "build_s": build, "save_s": save, "load_s": load, "add_10000_s": add,
        "built_rss_mib": rss, "disk_mib": disk, "sweep": sweep,
    }
    if a.json:
        print(json.dumps(result))
    else:
        print(f"hnswlib, {n} photos x {DIM}, M {a.M}, ef_construction {a.ef_construction}")
        print(f"  build {build:.1f} s ({a.threads} threads), save {save:.1f} s, load {load:.1f} s, "
              f"resident {rss:.0f} MiB, on disk {disk:.0f} MiB")
        for s in sweep:
            print(f"  ef {s['ef']:4}: text recall {s['text_recall']:.4f} at {s['text_qps']:.0f}/s, "
                  f"image {s['image_recall']:.4f} at {s['image_qps']:.0f}/s")
        if add is not None:
            print(f"  adding 10,000: {add:.1f} s")


if __name__ == "__main__":
    main()
