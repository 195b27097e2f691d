#!/usr/bin/env python3
"""transformers' CLIPModel on the same checkpoint and inputs as `cargo bench --bench model`.

    python scripts/reference/bench_model.py --dir target/bench/vit-b-32 [--threads 2] [--json]

Measures image embeddings per second at batch 1 and 16 (from pixel tensors,
as the Rust bench does) and the latency of a 10-token text query (tokenizer,
text tower, normalisation), under torch.inference_mode with a fixed number of
threads.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import CLIPModel, CLIPTokenizer

QUERY = "a photo of a dog on the beach"


def timed(warmup, runs, fn):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="target/bench/vit-b-32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    model = CLIPModel.from_pretrained(args.dir, dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(args.dir)
    tokens = len(tokenizer(QUERY)["input_ids"])
    assert tokens == 10, tokens
    g = torch.Generator().manual_seed(1)
    p1 = torch.randn(1, 3, 224, 224, generator=g)
    p16 = torch.randn(16, 3, 224, 224, generator=g)

    with torch.inference_mode():
        b1 = statistics.median(timed(3, 30, lambda: model.get_image_features(pixel_values=p1)))
        b16 = statistics.median(timed(1, 6, lambda: model.get_image_features(pixel_values=p16)))

        def query():
            ids = tokenizer([QUERY], return_tensors="pt")
            f = model.get_text_features(**ids).pooler_output
            return torch.nn.functional.normalize(f, dim=-1)

        text = sorted(timed(5, 100, query))
    result = {
        "impl": "transformers %s / torch %s" % (__import__("transformers").__version__, torch.__version__),
        "threads": args.threads,
        "image_per_s_batch1": 1.0 / b1,
        "image_per_s_batch16": 16.0 / b16,
        "text_ms_p50": text[len(text) // 2] * 1e3,
        "text_ms_p90": text[len(text) * 9 // 10] * 1e3,
        "query_tokens": tokens,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['impl']}, ViT-B/32, {args.threads} threads")
        print(f"  images/s, batch 1:   {result['image_per_s_batch1']:8.2f}")
        print(f"  images/s, batch 16:  {result['image_per_s_batch16']:8.2f}")
        print(f"  text query ({tokens} tokens): p50 {result['text_ms_p50']:.2f} ms, p90 {result['text_ms_p90']:.2f} ms")


if __name__ == "__main__":
    main()
