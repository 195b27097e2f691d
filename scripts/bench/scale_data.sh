#!/usr/bin/env bash
# The vectors of the scale benchmark (`cargo bench --bench scale`), made once
# and reused: a model trained here (the small-32 preset with a 512-d
# projection, one epoch of Fashion-MNIST), then
#   target/bench/scale/photos.f32        N + 10,000 augmented Fashion-MNIST training
#                                        images (random crop, flip, tint;
#                                        deterministic by seed), 512 f32 each
#   target/bench/scale/image-queries.f32 augmented test images (never photos)
#   target/bench/scale/text-queries.f32  caption-style texts, and their
#   target/bench/scale/texts.txt         words, one per line
#   target/bench/scale/meta.json         counts, model, seed
#
#   scripts/bench/scale_data.sh            # 1,000,000 photos (and 10,000 to add)
#   N=100000 scripts/bench/scale_data.sh   # fewer
# About 11 minutes on 2 cores for the million (6 for the model, 10 for the vectors).
#
# Needs the reference venv for the training images (scripts/reference/setup-venv.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv-ref/bin/python}
N=${N:-1000000}
OUT=target/bench/scale
MODEL=$OUT/model
mkdir -p "$OUT"
export RAYON_NUM_THREADS=${THREADS:-2}
if [ ! -f "$MODEL/model.safetensors" ]; then
  [ -f target/data/fashion-mnist/train.jsonl ] || "$PY" scripts/train/prepare.py
  cargo build --release -j2 --bin clipdex
  # small-32 with the projection widened to 512.
  python3 - "$OUT/config-512.json" <<'PY'
import json, sys
c = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4,
                    "num_hidden_layers": 4, "max_position_embeddings": 32, "vocab_size": 49408,
                    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 49406,
                    "eos_token_id": 49407, "pad_token_id": 1, "model_type": "clip_text_model"},
    "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4,
                      "num_hidden_layers": 4, "image_size": 32, "patch_size": 4, "num_channels": 3,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-5, "model_type": "clip_vision_model"},
}
json.dump(c, open(sys.argv[1], "w"), indent=2)
PY
  rm -rf "$MODEL"
  ./target/release/clipdex train --data target/data/fashion-mnist/train.jsonl --val-percent 0 \
    --out "$MODEL" --config "$OUT/config-512.json" --epochs 1 --batch 128 --lr 5e-4 --seed 0 --json \
    > "$OUT/train.json"
fi
cargo bench -j2 --bench scale --no-run
BIN=$(ls -t target/release/deps/scale-* | grep -v '\.d$' | head -1)
"$BIN" vectors --model "$MODEL" --out "$OUT" --photos $((N + 10000))
