#!/usr/bin/env python3
"""transformers' CLIPModel or SiglipModel, or open_clip's RN50, on the same checkpoint and inputs as
`cargo bench --bench model`.

    python scripts/reference/bench_model.py --dir target/bench/vit-b-32 [--threads 2] [--json]
    python scripts/reference/bench_model.py --family siglip --dir target/bench/siglip-b-16 [--prepare]
    python scripts/reference/bench_model.py --family open_clip_rn50 --dir target/bench/rn50 [--prepare]

For SigLIP it first writes the checkpoint the Rust bench loads (random
weights, google/siglip-base-patch16-224's architecture, the fixtures'
SentencePiece tokenizer); `--prepare` stops there.

Measures image embeddings per second at batch 1 and 16 (from pixel tensors,
as the Rust bench does) and the latency of a 10-token text query (tokenizer,
text tower, normalisation), under torch.inference_mode with a fixed number of
threads.
"""

import argparse
import json
import statistics
import time

import gzip
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPModel, CLIPTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

ROOT = Path(__file__).resolve().parents[2]

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


def write_siglip(out: Path) -> None:
    """A random SigLIP base-patch16-224 in Hugging Face layout."""
    if (out / "model.safetensors").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    fixture = ROOT / "tests/fixtures/models/siglip-tiny"
    with gzip.open(fixture / "spiece.model.gz") as f:
        (out / "spiece.model").write_bytes(f.read())
    shutil.copy(fixture / "tokenizer_config.json", out / "tokenizer_config.json")
    torch.manual_seed(0)
    SiglipModel(SiglipConfig()).eval().save_pretrained(out, safe_serialization=True)
    SiglipImageProcessor().save_pretrained(out)


# open_clip's RN50 (model_configs/RN50-quickgelu.json, as timm/resnet50_clip.openai ships it).
RN50 = {
    "embed_dim": 1024,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


def write_open_clip_rn50(out: Path) -> None:
    """A random open_clip RN50 in open_clip's hub layout (no tokenizer file, as timm's repositories)."""
    if (out / "open_clip_model.safetensors").is_file():
        return
    import open_clip
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**RN50).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    cfg = {"model_cfg": RN50, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                 "std": list(open_clip.OPENAI_DATASET_STD),
                                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))


# open_clip's xlm-roberta-base-ViT-B-32 (LAION's multilingual model) with xlm-roberta-base's text
# architecture; the tokenizer is the fixture's small SentencePiece one (no hub here), the same on both sides.
XLMR_TEXT = {
    "model_type": "xlm-roberta", "vocab_size": 1502, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 514,
    "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}
XLMR = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"hf_model_name": "xlmr-text", "hf_tokenizer_name": "xlmr-text", "hf_pooler_type": "mean_pooler",
                 "hf_proj_type": "mlp", "hf_model_pretrained": False},
}


def xlmr_cfg(directory: Path) -> dict:
    """XLMR with the text model's folder as an absolute path, as open_clip in Python needs it."""
    cfg = json.loads(json.dumps(XLMR))
    for key in ("hf_model_name", "hf_tokenizer_name"):
        cfg["text_cfg"][key] = str((directory / "xlmr-text").resolve())
    return cfg


def write_open_clip_xlmr(out: Path) -> None:
    """A random xlm-roberta-base-ViT-B-32 in open_clip's layout, its text model in the subfolder it names."""
    if (out / "open_clip_model.safetensors").is_file():
        return
    import open_clip
    from safetensors.torch import save_file

    text = out / "xlmr-text"
    text.mkdir(parents=True, exist_ok=True)
    (text / "config.json").write_text(json.dumps(XLMR_TEXT, indent=2))
    hub = ROOT / "tests/fixtures/hub/clipdex-fixtures--xlm-roberta-tiny"
    with gzip.open(hub / "tokenizer.json.gz") as f:
        (text / "tokenizer.json").write_bytes(f.read())
    shutil.copy(hub / "tokenizer_config.json", text / "tokenizer_config.json")
    torch.manual_seed(0)
    model = open_clip.model.CustomTextCLIP(**xlmr_cfg(out)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    cfg = {"model_cfg": XLMR, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                                 "std": list(open_clip.OPENAI_DATASET_STD),
                                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--family", choices=["clip", "siglip", "open_clip_rn50", "open_clip_xlmr"], default="clip")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prepare", action="store_true", help="write the SigLIP or RN50 checkpoint and stop")
    args = ap.parse_args()
    siglip = args.family == "siglip"
    rn50 = args.family == "open_clip_rn50"
    xlmr = args.family == "open_clip_xlmr"
    directory = args.dir or {"siglip": "target/bench/siglip-b-16", "open_clip_rn50": "target/bench/rn50",
                             "open_clip_xlmr": "target/bench/xlmr-b-32"}.get(args.family, "target/bench/vit-b-32")
    if siglip or rn50 or xlmr:
        writer = write_siglip if siglip else write_open_clip_rn50 if rn50 else write_open_clip_xlmr
        writer(Path(directory))
        if args.prepare:
            return
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if rn50 or xlmr:
        import open_clip
        from safetensors.torch import load_file

        if rn50:
            clip = open_clip.model.CLIP(**RN50).eval()
            tokenizer = open_clip.get_tokenizer("RN50")
            tokens = int((tokenizer([QUERY]) != 0).sum())
        else:
            clip = open_clip.model.CustomTextCLIP(**xlmr_cfg(Path(directory))).eval()
            tokenizer = open_clip.tokenizer.HFTokenizer(str((Path(directory) / "xlmr-text").resolve()))
            tokens = int((tokenizer([QUERY]) != 1).sum())
        clip.load_state_dict(load_file(str(Path(directory) / "open_clip_model.safetensors")))
        encode = lambda: tokenizer([QUERY])
        size = 224

        class Features:
            """open_clip's encoders under transformers' method names."""
            get_image_features = staticmethod(lambda pixel_values: clip.encode_image(pixel_values))

        model = Features()
    elif siglip:
        model = SiglipModel.from_pretrained(directory, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        # SigLIP's text tower takes the fixed length it was trained at.
        encode = lambda: tokenizer([QUERY], padding="max_length", max_length=64, truncation=True, return_tensors="pt")
        tokens = len(tokenizer(QUERY)["input_ids"])
        size = 224
    else:
        model = CLIPModel.from_pretrained(directory, dtype=torch.float32).eval()
        tokenizer = CLIPTokenizer.from_pretrained(directory)
        encode = lambda: tokenizer([QUERY], return_tensors="pt")
        tokens = len(tokenizer(QUERY)["input_ids"])
        assert tokens == 10, tokens
        size = 224
    g = torch.Generator().manual_seed(1)
    p1 = torch.randn(1, 3, size, size, generator=g)
    p16 = torch.randn(16, 3, size, size, generator=g)

    with torch.inference_mode():
        b1 = statistics.median(timed(3, 30, lambda: model.get_image_features(pixel_values=p1)))
        b16 = statistics.median(timed(1, 6, lambda: model.get_image_features(pixel_values=p16)))

        def query():
            ids = encode()
            if rn50 or xlmr:
                f = clip.encode_text(ids)
            elif siglip:
                f = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
            else:
                f = model.get_text_features(**ids).pooler_output
            return torch.nn.functional.normalize(f, dim=-1)

        text = sorted(timed(5, 100, query))
    result = {
        "impl": ("open_clip %s" % __import__("open_clip").__version__ if rn50 or xlmr else
                 "transformers %s" % __import__("transformers").__version__) + " / torch %s" % torch.__version__,
        "model": "SigLIP B/16-224" if siglip else "open_clip RN50" if rn50 else
                 "open_clip xlm-roberta-base-ViT-B-32" if xlmr else "ViT-B/32",
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
        print(f"{result['impl']}, {result['model']}, {args.threads} threads")
        print(f"  images/s, batch 1:   {result['image_per_s_batch1']:8.2f}")
        print(f"  images/s, batch 16:  {result['image_per_s_batch16']:8.2f}")
        print(f"  text query ({tokens} tokens): p50 {result['text_ms_p50']:.2f} ms, p90 {result['text_ms_p90']:.2f} ms")


if __name__ == "__main__":
    main()
