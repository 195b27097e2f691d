#!/usr/bin/env python3
"""Generates the reference fixtures that clipdex's numerical tests compare against.

Everything here comes from the reference implementation (transformers' CLIPModel,
CLIPTokenizer and CLIPImageProcessor, on PyTorch), run on CPU with fixed seeds:

  tests/fixtures/models/<name>/   small random-initialised CLIP checkpoints in
                                  Hugging Face layout (big files gzipped) plus
                                  reference.json / reference.safetensors: token
                                  ids, pixel tensors, features, logits
  tests/fixtures/tokenizer-cases.json.gz
                                  >= 1,000 varied strings and their token ids
  tests/fixtures/images/          small images in every format clipdex decodes,
                                  made from one of the shared photos
  tests/fixtures/preprocess.safetensors
                                  reference pixel tensors (uint8 after resize
                                  and crop) for shared photos at 224 px and for
                                  the format images at 64 px

Usage (no hub access is needed; the OpenAI BPE vocabulary ships in open-clip-torch):

  python3 -m venv .venv-ref && .venv-ref/bin/pip install -r scripts/reference/requirements.txt
  .venv-ref/bin/python scripts/reference/make_fixtures.py [--extra-config my.json --name mine]

`--extra-config` adds one more checkpoint from a CLIPConfig JSON (text_config,
vision_config, projection_dim, ...): the Rust tests pick up every folder under
tests/fixtures/models/, so a config the tests have never seen is checked by
running this script and then the README's test command.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.numpy import save_file as save_numpy
from transformers import CLIPConfig, CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
PHOTOS = ROOT.parent / "shared" / "datasets" / "photos"

# Real photos the model-level tests embed. Landscape, portrait, grey, huge, small.
MODEL_PHOTOS = [
    "wallpapers/pypi_scikit-image/chelsea.jpg",
    "wallpapers/pypi_scikit-image/camera.jpg",
    "wallpapers/pypi_scikit-image/astronaut.jpg",
    "wallpapers/pypi_scikit-learn/china.jpg",
    "wallpapers/debian_lomiri-wallpapers-16.04/Wine_by_Jakkub_Mede.jpg",
    "wallpapers/debian_mate-backgrounds_nature/LadyBird.jpg",
    "gcompris/fishes/fish1.jpg",
    "gcompris/monuments/" + "{first}",
]
# Photos whose 224-px preprocessing is compared pixel by pixel.
PREPROCESS_PHOTOS = [
    "wallpapers/pypi_scikit-image/coffee.jpg",
    "wallpapers/pypi_scikit-image/moon.jpg",
    "wallpapers/debian_lomiri-wallpapers-20.04/Kleiber_by_Lukas_Baubkus.jpg",
    "wallpapers/debian_lomiri-wallpapers-16.04/friends_by_Aitzol_Berasategi.jpg",
]

TEXTS = [
    "a photo of a cat",
    "A PHOTO OF A DOG!",
    "two fish swimming near a coral reef",
    "le café à Paris 🥐",
    "日本の寺院と桜",
    "a",
    "the Eiffel tower at night, lit up &amp; crowded",
    "an astronaut holding a flag, 1984",
    "red <|endoftext|> blue",
    " ".join(["a very long caption that goes on and on about the picture"] * 12),
]

CONFIGS = {
    # OpenAI-like: quick_gelu, f32 weights, tokenizer.json.
    "openai-tiny": {
        "config": {
            "projection_dim": 24,
            "logit_scale_init_value": 2.6592,
            "text_config": {
                "hidden_size": 32,
                "intermediate_size": 80,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 77,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
            },
            "vision_config": {
                "hidden_size": 48,
                "intermediate_size": 96,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
            },
        },
        "dtype": torch.float32,
        "tokenizer": "json",
        "seed": 1,
    },
    # LAION-like: exact gelu, other depths, heads, patch size and eps, f16 weights,
    # vocab.json + merges.txt only, LAION's mean and std.
    "laion-tiny": {
        "config": {
            "projection_dim": 20,
            "logit_scale_init_value": 2.3,
            "text_config": {
                "hidden_size": 40,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 5,
                "max_position_embeddings": 77,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-6,
            },
            "vision_config": {
                "hidden_size": 36,
                "intermediate_size": 72,
                "num_hidden_layers": 2,
                "num_attention_heads": 3,
                "image_size": 48,
                "patch_size": 16,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-6,
            },
        },
        "dtype": torch.float16,
        "tokenizer": "files",
        "pickle": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "seed": 2,
    },
}


def bytes_to_unicode() -> dict[int, str]:
    """The byte-to-printable-character table of GPT-2 / CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def openai_vocab() -> tuple[dict[str, int], list[str]]:
    """Builds CLIP's 49,408-token vocabulary and merges from open_clip's copy of OpenAI's BPE file."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(p) for p in pairs]


def tokenizer_cases(seed: int = 7, count: int = 1200) -> list[str]:
    """Varied strings: punctuation, numbers, accents, emoji, CJK, entities, whitespace, long texts."""
    fixed = [
        "",
        " ",
        "a",
        "A",
        "hello world",
        "Hello, World!",
        "HELLO   WORLD",
        "it's a dog's life; we'll see, they're here, I'D go, you've, I'm",
        "'s 't 're 've 'm 'll 'd",
        "don't STOP",
        "3.14159 and 2,718 and 1e10 and -42 and +7",
        "2024-11-28 12:34:56",
        "phone: +33 (0)1 23 45 67 89",
        "café naïve façade Ångström São Paulo Zürich",
        "e\u0301 vs \u00e9",  # combining accent, NFC
        "ﬁ ligature ﬂ",
        "😀 😂 👍🏽 👨‍👩‍👧 🇫🇷 ❤️",
        "漢字 日本語のテキスト 한국어 텍스트 中文",
        "Привет мир, Γειά σου Κόσμε",
        "مرحبا بالعالم שלום עולם",
        "สวัสดีชาวโลก नमस्ते दुनिया",
        "&amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &nbsp; &copy;",
        "<b>html</b> <a href='x'>link</a>",
        "https://example.com/path?q=1&r=2#frag",
        "user@example.org #hashtag @mention",
        "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2003em",
        "zero\u200bwidth\u200djoiner",
        "<|startoftext|>",
        "<|endoftext|>",
        "a <|endoftext|> b <|startoftext|> c",
        "<|ENDOFTEXT|>",
        "!!!???...,,,;;;:::",
        "((([[[{{{}}}]]])))",
        "~`@#$%^&*_+=|\\/<>",
        "----____====",
        "a-b_c.d/e\\f",
        "123456789012345678901234567890",
        "٣٤٥ ١٢٣ ४५६",
        "ＡＢＣ ｆｕｌｌｗｉｄｔｈ １２３",
        "Ⅻ ⅓ ² ³ ¼",
        "\u0000 null and \u0007 bell",
        "x" * 300,
        "word " * 200,
        "ab" * 150,
    ]
    words = (
        "a an the photo picture image of with and on in at by near two three red blue green yellow black white "
        "cat dog fish bird horse car bicycle tree flower beach mountain river city street night day sunset snow "
        "rain coral reef temple castle bridge boat sky cloud portrait landscape close-up macro vintage old new "
        "big small tiny huge happy sad running sitting sleeping flying swimming eating golden retriever tabby"
    ).split()
    exotic = [
        "café", "naïve", "Ünïcödé", "smörgåsbord", "jalapeño", "crème brûlée", "piñata", "Ærøskøbing",
        "😀", "🐶", "🌊", "🏔️", "👍🏽", "🇯🇵", "✨", "🎉", "猫", "犬", "寿司", "東京", "北京", "서울",
        "кошка", "собака", "γάτα", "قطة", "חתול", "แมว", "बिल्ली",
        "&amp;", "&lt;", "&gt;", "&quot;", "&#x27;", "&nbsp;",
        "IMG_2041.JPG", "DSC-0001", "v1.2.3", "1920x1080", "50%", "$9.99", "€5", "#1", "@home",
        "it's", "we're", "they'd", "you'll", "I've", "O'Brien", "rock'n'roll",
    ]
    punct = [",", ".", "!", "?", ";", ":", "-", "--", "...", "(", ")", "\"", "'", "/", "&", "*", "+", "=", "%"]
    spaces = [" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000"]
    rng = random.Random(seed)
    cases = list(fixed)
    while len(cases) < count:
        n = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 90])
        parts = []
        for _ in range(n):
            r = rng.random()
            if r < 0.55:
                w = rng.choice(words)
            elif r < 0.75:
                w = rng.choice(exotic)
            elif r < 0.85:
                w = str(rng.randint(0, 10 ** rng.randint(1, 8)))
            else:
                w = rng.choice(punct)
            case = rng.random()
            if case < 0.1:
                w = w.upper()
            elif case < 0.2:
                w = w.capitalize()
            parts.append(w)
            parts.append(rng.choice(spaces))
        cases.append("".join(parts).strip() if rng.random() < 0.8 else "".join(parts))
    return cases


def gz_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as raw:
        # mtime=0 keeps the output byte-identical between runs.
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
            f.write(data)


def write_tokenizer(tokenizer: CLIPTokenizer, vocab: dict[str, int], merges: list[str], out: Path, kind: str) -> None:
    tmp = out / "_tok"
    tokenizer.save_pretrained(tmp)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tmp / name).exists():
            shutil.copy(tmp / name, out / name)
    if kind == "json":
        gz_write(out / "tokenizer.json.gz", (tmp / "tokenizer.json").read_bytes())
        # The same file is clipdex's built-in tokenizer, for models trained from scratch.
        shutil.copy(out / "tokenizer.json.gz", ROOT / "src" / "model" / "clip_tokenizer.json.gz")
    else:
        gz_write(out / "vocab.json.gz", json.dumps(vocab, ensure_ascii=False).encode())
        gz_write(out / "merges.txt.gz", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    shutil.rmtree(tmp)


def load_photo(rel: str) -> Image.Image:
    img = Image.open(PHOTOS / rel)
    return ImageOps.exif_transpose(img)


def resolve_photos() -> list[str]:
    first_monument = sorted(p.name for p in (PHOTOS / "gcompris" / "monuments").iterdir())[0]
    return [p.format(first=first_monument) for p in MODEL_PHOTOS]


def make_model(name: str, spec: dict, vocab, merges, tokenizer: CLIPTokenizer, photos: list[str]) -> None:
    out = FIXTURES / "models" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(spec.get("seed", 0))
    config = CLIPConfig(**spec["config"])
    model = CLIPModel(config).eval()

    ids = tokenizer(TEXTS, truncation=True, max_length=77)["input_ids"]
    used = sorted({i for row in ids for i in row} | {tokenizer.pad_token_id})
    with torch.no_grad():
        # Rows of the token table that no fixture text looks up are zeroed, so
        # the gzipped checkpoint stays small; they never reach an output.
        emb = model.text_model.embeddings.token_embedding.weight
        keep = emb[used].clone()
        emb.zero_()
        emb[used] = keep
    model = model.to(spec["dtype"])
    model.save_pretrained(out / "_ckpt", safe_serialization=True)
    shutil.copy(out / "_ckpt" / "config.json", out / "config.json")
    gz_write(out / "model.safetensors.gz", (out / "_ckpt" / "model.safetensors").read_bytes())
    if spec.get("pickle"):
        # The same weights as a PyTorch pickle, for the pytorch_model.bin loader.
        torch.save(model.state_dict(), out / "_ckpt" / "pytorch_model.bin")
        gz_write(out / "pytorch_model.bin.gz", (out / "_ckpt" / "pytorch_model.bin").read_bytes())
    shutil.rmtree(out / "_ckpt")
    write_tokenizer(tokenizer, vocab, merges, out, spec["tokenizer"])

    size = spec["config"]["vision_config"]["image_size"]
    proc_kwargs = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if "image_mean" in spec:
        proc_kwargs.update(image_mean=spec["image_mean"], image_std=spec["image_std"])
    processor = CLIPImageProcessor(**proc_kwargs)
    processor.save_pretrained(out)

    images = [load_photo(p) for p in photos]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]

    # The reference runs in f32 on the checkpoint's weights, as a user of
    # CLIPModel.from_pretrained(..., dtype=torch.float32) gets them.
    model = model.float()
    padded = tokenizer(TEXTS, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        full = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], pixel_values=pixels)
        text_features = model.get_text_features(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]
        ).pooler_output
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
    save_reference(out, model, padded["input_ids"], pixels, full, text_features, image_features)
    meta = {
        "texts": TEXTS,
        "token_ids": ids,
        "photos": photos,
        "reference": "transformers %s CLIPModel, torch %s, CPU, float32" % (
            __import__("transformers").__version__, torch.__version__),
    }
    (out / "reference.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    print(f"{name}: {sum(f.stat().st_size for f in out.iterdir()) / 1e6:.2f} MB")


def save_reference(out: Path, model, input_ids, pixels, full, text_features, image_features) -> None:
    """The reference's inputs and outputs as `reference.safetensors` (SigLIP's bias too)."""
    tensors = {
        "input_ids": input_ids.numpy().astype(np.int64),
        "pixel_values": pixels.numpy().astype(np.float32),
        "text_features": text_features.numpy(),
        "image_features": image_features.numpy(),
        "text_embeds": full.text_embeds.numpy(),
        "image_embeds": full.image_embeds.numpy(),
        "logits_per_image": full.logits_per_image.numpy(),
        "logit_scale": model.logit_scale.detach().reshape(1).numpy(),
    }
    if getattr(model, "logit_bias", None) is not None:
        tensors["logit_bias"] = model.logit_bias.detach().reshape(1).numpy()
    save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / "reference.safetensors"))


def make_format_images(src_rel: str) -> list[tuple[str, Image.Image]]:
    """Small test images in every format clipdex decodes, and the images the reference sees."""
    out = FIXTURES / "images"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    base = load_photo(src_rel).convert("RGB")
    base = base.resize((150, 100), Image.Resampling.BICUBIC)
    made = []

    def save(name, img, **kw):
        img.save(out / name, **kw)
        made.append(name)

    save("photo.png", base)
    rgba = base.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(base.size)
    rgba.putalpha(alpha)
    save("alpha.png", rgba)
    save("grey.png", base.convert("L"))
    grey16 = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
    save("grey16.png", grey16)
    save("palette.gif", base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    save("photo.bmp", base)
    save("photo.tiff", base)
    save("photo.webp", base, lossless=True)
    save("photo.jpg", base, quality=92)
    save("grey.jpg", base.convert("L"), quality=92)
    save("cmyk.jpg", base.convert("CMYK"), quality=92)
    for orientation, transpose in ((3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        # Store the pixels turned the other way, with the tag that turns them back.
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"orientation{orientation}.jpg", base.transpose(transpose), quality=92, exif=exif.tobytes())
    # Bad inputs: the tests expect a clear error for each.
    (out / "empty.jpg").write_bytes(b"")
    jpg = (out / "photo.jpg").read_bytes()
    (out / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (out / "text.jpg").write_bytes(b"this is not an image\n")
    return [(name, Image.open(out / name)) for name in made if name != "grey16.png"]


def make_preprocess(format_images) -> None:
    tensors = {}
    names = {}
    for size, items in ((224, [(p, load_photo(p)) for p in PREPROCESS_PHOTOS]), (64, format_images)):
        kwargs = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        # The default (torchvision) backend is the reference; the PIL backend
        # (CLIPImageProcessorPil, OpenAI's original pipeline) differs from it by one
        # level in under 1% of pixels. PIL results are kept for the small images,
        # where clipdex must match them exactly.
        backends = [("torchvision", CLIPImageProcessor(**kwargs))]
        if size == 64:
            backends.append(("pil", CLIPImageProcessorPil(**kwargs)))
        for backend, proc in backends:
            for i, (name, img) in enumerate(items):
                img = ImageOps.exif_transpose(img)
                x = proc(images=[img], return_tensors="pt")["pixel_values"][0].numpy()
                mean = np.array(proc.image_mean, dtype=np.float64)[:, None, None]
                std = np.array(proc.image_std, dtype=np.float64)[:, None, None]
                # Undo the normalisation: both backends resize to uint8, so this is exact.
                u8 = np.rint((x.astype(np.float64) * std + mean) * 255.0)
                assert np.abs(u8 - (x.astype(np.float64) * std + mean) * 255.0).max() < 1e-3
                key = f"{size}/{i}" if backend == "torchvision" else f"{size}/{i}/pil"
                tensors[key] = u8.astype(np.uint8).transpose(1, 2, 0).copy()
                names[f"{size}/{i}"] = name
    save_numpy(tensors, str(FIXTURES / "preprocess.safetensors"))
    (FIXTURES / "preprocess.json").write_text(json.dumps(names, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extra-config", type=Path, help="a CLIPConfig JSON to add as one more fixture model")
    parser.add_argument("--name", default="extra", help="folder name for --extra-config")
    parser.add_argument("--only-extra", action="store_true", help="write only the --extra-config model")
    args = parser.parse_args()
    if not PHOTOS.is_dir():
        sys.exit(f"shared photos not found at {PHOTOS}")
    torch.set_num_threads(2)
    FIXTURES.mkdir(parents=True, exist_ok=True)

    vocab, merges = openai_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tokenizer.model_max_length = 77
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407], "vocabulary is off"
    photos = resolve_photos()

    configs = {} if args.only_extra else dict(CONFIGS)
    if args.extra_config:
        configs[args.name] = {"config": json.loads(args.extra_config.read_text()), "dtype": torch.float32,
                              "tokenizer": "json", "seed": 3}
    for name, spec in configs.items():
        make_model(name, spec, vocab, merges, tokenizer, photos)
    if args.only_extra:
        return

    cases = tokenizer_cases()
    ids = tokenizer(cases, truncation=True, max_length=77)["input_ids"]
    untruncated = tokenizer(cases)["input_ids"]
    gz_write(FIXTURES / "tokenizer-cases.json.gz", json.dumps(
        {"cases": [{"text": t, "ids": i, "full": u} for t, i, u in zip(cases, ids, untruncated)]},
        ensure_ascii=False).encode())

    formats = make_format_images("wallpapers/pypi_scikit-image/chelsea.jpg")
    make_preprocess(formats)
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB in {FIXTURES}")


if __name__ == "__main__":
    main()
