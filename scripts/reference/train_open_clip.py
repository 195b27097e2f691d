#!/usr/bin/env python3
"""The reference trainer: open_clip (open-clip-torch from PyPI) on CPU with the
same architecture, data, batch size, learning rate, schedule, epochs and seed
as `clipdex train`, evaluated with the same metrics as `clipdex eval`.

    python scripts/reference/train_open_clip.py --preset small-32 --train target/data/fashion-mnist/train.csv \\
        --epochs 3 --batch 128 --lr 5e-4 --seed 0 --zero-shot target/data/fashion-mnist/test \\
        --templates target/data/fashion-mnist/templates.txt
    python scripts/reference/train_open_clip.py --preset small-64 --train target/data/tuxpaint/train.csv \\
        --retrieval target/data/tuxpaint/val.csv --epochs 30 --batch 64 --lr 5e-4

Prints one JSON line with samples/s and the metrics.
"""

import argparse
import csv
import json
import math
import os
import random
import statistics
import tempfile
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def preset(name):
    """clipdex's ClipConfig::small(image, patch, width, layers), as an open_clip model config."""
    image, patch, width, layers = {"tiny-32": (32, 8, 64, 2), "small-32": (32, 4, 128, 4), "small-64": (64, 8, 128, 4)}[name]
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": image, "layers": layers, "width": width, "patch_size": patch, "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": max(width // 32, 1), "layers": layers, "mlp_ratio": 4.0},
    }


class Pairs(Dataset):
    def __init__(self, path, transform, tokenizer):
        with open(path) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        self.files = [r["filepath"] for r in rows]
        self.titles = [r["title"] for r in rows]
        self.transform = transform
        self.tokens = tokenizer(self.titles)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.transform(Image.open(self.files[i]).convert("RGB")), self.tokens[i]


def class_name(folder):
    return " ".join(folder.replace("-", " ").replace("_", " ").split())


@torch.no_grad()
def embed_images(model, paths, transform, batch=128):
    out = []
    for i in range(0, len(paths), batch):
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i : i + batch]])
        out.append(F.normalize(model.encode_image(x), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch=256):
    return torch.cat([F.normalize(model.encode_text(tokenizer(texts[i : i + batch])), dim=-1) for i in range(0, len(texts), batch)])


def recall(ranks):
    ranks = sorted(ranks)
    n = len(ranks)
    within = lambda k: 100.0 * sum(r <= k for r in ranks) / n
    return {"r1": within(1), "r5": within(5), "r10": within(10), "median_rank": float(statistics.median(ranks))}


@torch.no_grad()
def retrieval(model, tokenizer, path, transform):
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    files, first = [], {}
    image_of = []
    for r in rows:
        if r["filepath"] not in first:
            first[r["filepath"]] = len(files)
            files.append(r["filepath"])
        image_of.append(first[r["filepath"]])
    img = embed_images(model, files, transform)
    txt = embed_texts(model, tokenizer, [r["title"] for r in rows])
    sim = (img @ txt.T).numpy()
    t2i = [1 + int((sim[:, t] > sim[image_of[t], t]).sum()) for t in range(len(rows))]
    i2t = []
    for i in range(len(files)):
        mine = [t for t in range(len(rows)) if image_of[t] == i]
        best = sim[i, mine].max()
        others = [t for t in range(len(rows)) if image_of[t] != i]
        i2t.append(1 + int((sim[i, others] > best).sum()))
    return {"images": len(files), "texts": len(rows), "image_to_text": recall(i2t), "text_to_image": recall(t2i)}


def read_templates(path):
    """One template per line, as `clipdex eval zero-shot --templates` reads them."""
    lines = [l.strip() for l in open(path)]
    return [l for l in lines if l and not l.startswith("#")]


@torch.no_grad()
def zero_shot(model, tokenizer, folder, templates, transform):
    classes = sorted(os.listdir(folder))
    names = [class_name(c) for c in classes]
    weights = []
    for n in names:
        e = embed_texts(model, tokenizer, [t.format(n) for t in templates])
        weights.append(F.normalize(e.mean(0), dim=-1))
    weights = torch.stack(weights)
    paths, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(folder, c))):
            paths.append(os.path.join(folder, c, f))
            labels.append(k)
    img = embed_images(model, paths, transform)
    scores = img @ weights.T
    top = scores.topk(min(5, len(classes)), dim=1).indices.numpy()
    labels = np.array(labels)
    return {"images": len(paths), "classes": len(classes), "top1": 100.0 * float((top[:, 0] == labels).mean()), "top5": 100.0 * float((top == labels[:, None]).any(1).mean())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=None, help="steps; default 5%% of the run, as clipdex")
    ap.add_argument("--weight-decay", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--retrieval")
    ap.add_argument("--zero-shot")
    ap.add_argument("--templates", help="prompt templates for --zero-shot, one per line, {} for the class name")
    args = ap.parse_args()
    if args.zero_shot and not args.templates:
        ap.error("--zero-shot needs --templates")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"clipdex-{args.preset}.json")
        with open(path, "w") as f:
            json.dump(preset(args.preset), f)
        open_clip.add_model_config(path)
        model = open_clip.create_model(f"clipdex-{args.preset}", pretrained=None)
    tokenizer = open_clip.get_tokenizer(f"clipdex-{args.preset}")
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    # clipdex's augmentation: shortest side to 9/8 of the input, bicubic; a random square crop.
    train_tf = T.Compose([T.Resize(math.ceil(size * 9 / 8), interpolation=T.InterpolationMode.BICUBIC), T.RandomCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    eval_tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    data = Pairs(args.train, train_tf, tokenizer)
    g = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=1, generator=g, persistent_workers=True)

    # clipdex's AdamW: no decay on gains, biases, embeddings, the temperature.
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n or n.endswith("bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(data) // args.batch
    total = steps_per_epoch * args.epochs
    warmup = args.warmup if args.warmup is not None else total // 20
    loss_fn = open_clip.ClipLoss()

    def lr_at(step):
        if warmup and step < warmup:
            return args.lr * (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * args.lr * (1 + math.cos(math.pi * progress))

    model.train()
    step = 0
    start = time.perf_counter()
    losses = []
    for epoch in range(args.epochs):
        for images, texts in loader:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            image_features, text_features, logit_scale = model(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    result = {
        "impl": f"open_clip {open_clip.__version__} / torch {torch.__version__}",
        "preset": args.preset,
        "steps": step,
        "samples_per_second": step * args.batch / seconds,
        "train_seconds": seconds,
        "final_loss": float(np.mean(losses[-max(1, steps_per_epoch // 4):])),
    }
    if args.retrieval:
        result["retrieval"] = retrieval(model, tokenizer, args.retrieval, eval_tf)
    if args.zero_shot:
        result["zero_shot"] = zero_shot(model, tokenizer, args.zero_shot, read_templates(args.templates), eval_tf)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
