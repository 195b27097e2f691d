"""Recall@10 of served indexes against an exact one, through their APIs.

200 text queries ("a red car", ...) by meaning alone (no keywords, no
cutoff); each index is compared by paths with the exact one's top 10.

    clipdex serve --index EXACT --bind 127.0.0.1:18092 &   # e.g. Milvus ?index=flat
    clipdex serve --index A --bind 127.0.0.1:18090 &
    python3 scripts/bench/recall_servers.py http://127.0.0.1:18092 http://127.0.0.1:18090 [...]
"""
import itertools
import json
import sys
import urllib.parse
import urllib.request

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "grey"]
THINGS = ["car", "dog", "cat", "tree", "house", "flower", "bird", "boat", "mountain", "person",
          "fish", "hammer", "chair", "sky", "beach", "road", "book", "clock", "cup", "horse"]
K = 10


def top(base, query):
    params = urllib.parse.urlencode({"q": query, "k": K, "hybrid": "false", "cutoff": "none"})
    with urllib.request.urlopen(f"{base}/api/search?{params}") as r:
        return [h["path"] for h in json.load(r)["hits"]]


def main():
    exact, *others = sys.argv[1:]
    if not others:
        sys.exit(__doc__)
    queries = [f"a {c} {t}" for c, t in itertools.product(COLOURS, THINGS)]
    recall = dict.fromkeys(others, 0.0)
    for q in queries:
        truth = set(top(exact, q))
        if len(truth) != K:
            sys.exit(f"{exact} gave {len(truth)} results for {q!r}, not {K}")
        for base in others:
            recall[base] += len(truth & set(top(base, q))) / K
    for base, total in recall.items():
        print(f"{base}: recall@{K} {total / len(queries):.4f} over {len(queries)} text queries")


if __name__ == "__main__":
    main()
