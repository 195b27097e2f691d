#!/usr/bin/env bash
# clipdex train against open_clip: same architecture, data, batch size,
# learning rate, schedule, epochs and seed, 2 threads each, evaluated with the
# same metrics. Prints both tables; the raw records land in target/bench/train/.
#
#   scripts/bench/train.sh            # both datasets
#   scripts/bench/train.sh fmnist     # Fashion-MNIST only
#   scripts/bench/train.sh tuxpaint   # Tux Paint only
#
# Needs a release build and the reference venv (scripts/reference/setup-venv.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv-ref/bin/python}
WHICH=${1:-all}
SEED=${SEED:-0}
D=target/data
B=target/bench/train
mkdir -p "$B"
"$PY" scripts/train/prepare.py
export RAYON_NUM_THREADS=2

if [ "$WHICH" = all ] || [ "$WHICH" = fmnist ]; then
  E=${EPOCHS_FMNIST:-3}
  rm -rf "$B/fmnist-clipdex"
  ./target/release/clipdex train --data "$D/fashion-mnist/train.jsonl" --val-percent 0 --out "$B/fmnist-clipdex" \
    --config small-32 --epochs "$E" --batch 128 --lr 5e-4 --seed "$SEED" --json > "$B/fmnist-clipdex-train.json"
  ./target/release/clipdex eval zero-shot --model "$B/fmnist-clipdex" --data "$D/fashion-mnist/test" \
    --templates "$D/fashion-mnist/templates.txt" --json \
    > "$B/fmnist-clipdex-eval.json"
  "$PY" scripts/reference/train_open_clip.py --preset small-32 --train "$D/fashion-mnist/train.csv" --epochs "$E" \
    --batch 128 --lr 5e-4 --seed "$SEED" --zero-shot "$D/fashion-mnist/test" \
    --templates "$D/fashion-mnist/templates.txt" 2>/dev/null > "$B/fmnist-open_clip.json"
fi

if [ "$WHICH" = all ] || [ "$WHICH" = tuxpaint ]; then
  E=${EPOCHS_TUXPAINT:-40}
  rm -rf "$B/tuxpaint-clipdex"
  ./target/release/clipdex train --data "$D/tuxpaint/train.jsonl" --val "$D/tuxpaint/val.jsonl" --out "$B/tuxpaint-clipdex" \
    --config small-64 --epochs "$E" --batch 64 --lr 5e-4 --seed "$SEED" --json > "$B/tuxpaint-clipdex-train.json"
  ./target/release/clipdex eval retrieval --model "$B/tuxpaint-clipdex" --data "$D/tuxpaint/val.jsonl" --json \
    > "$B/tuxpaint-clipdex-eval.json"
  "$PY" scripts/reference/train_open_clip.py --preset small-64 --train "$D/tuxpaint/train.csv" --epochs "$E" \
    --batch 64 --lr 5e-4 --seed "$SEED" --retrieval "$D/tuxpaint/val.csv" 2>/dev/null > "$B/tuxpaint-open_clip.json"
fi

python3 - "$B" "$WHICH" <<'PY'
import json, os, sys
b, which = sys.argv[1], sys.argv[2]
def load(name):
    p = os.path.join(b, name)
    return json.load(open(p)) if os.path.exists(p) else None
if which in ("all", "fmnist"):
    t, e, o = load("fmnist-clipdex-train.json"), load("fmnist-clipdex-eval.json"), load("fmnist-open_clip.json")
    print("Fashion-MNIST, small-32 (32 px ViT, patch 4, width 128, 4+4 layers), zero-shot on the 10,000 test images")
    print(f"{'':28}{'clipdex':>10}{'open_clip':>11}{'diff':>8}")
    for label, a, c in [("zero-shot top-1 %", e["metrics"]["top1"], o["zero_shot"]["top1"]),
                        ("zero-shot top-5 %", e["metrics"]["top5"], o["zero_shot"]["top5"])]:
        print(f"{label:28}{a:10.2f}{c:11.2f}{a - c:+8.2f}")
    a, c = t["samples_per_second"], o["samples_per_second"]
    print(f"{'training samples/s':28}{a:10.1f}{c:11.1f}{a / c:7.2f}x")
if which in ("all", "tuxpaint"):
    t, e, o = load("tuxpaint-clipdex-train.json"), load("tuxpaint-clipdex-eval.json"), load("tuxpaint-open_clip.json")
    print("Tux Paint, small-64 (64 px ViT, patch 8), retrieval on the 20% held out")
    print(f"{'':28}{'clipdex':>10}{'open_clip':>11}{'diff':>8}")
    for d, name in [("image_to_text", "image->text"), ("text_to_image", "text->image")]:
        for k in ["r1", "r5", "r10"]:
            a, c = e["metrics"][d][k], o["retrieval"][d][k]
            print(f"{name + ' ' + k.upper():28}{a:10.2f}{c:11.2f}{a - c:+8.2f}")
        a, c = e["metrics"][d]["median_rank"], o["retrieval"][d]["median_rank"]
        print(f"{name + ' median rank':28}{a:10.1f}{c:11.1f}{a - c:+8.1f}")
    a, c = t["samples_per_second"], o["samples_per_second"]
    print(f"{'training samples/s':28}{a:10.1f}{c:11.1f}{a / c:7.2f}x")
PY
