#!/usr/bin/env python3
"""Generates the SigLIP reference fixtures clipdex's numerical tests compare against.

Everything comes from the reference implementation (transformers' SiglipModel,
SiglipTokenizer on the sentencepiece library, GemmaTokenizer on tokenizers,
SiglipImageProcessor), on CPU with fixed seeds. No hub access is needed: the
tokenizers are trained here on a small corpus.

  tests/fixtures/models/siglip-tiny/    SigLIP layout: config.json (model_type
                                        "siglip"), model.safetensors, spiece.model
                                        (gzipped, as the big files of every fixture)
                                        (a SentencePiece Unigram model, nmt_nfkc
                                        normalisation, as google/siglip-* ship)
  tests/fixtures/models/siglip2-tiny/   SigLIP 2 fixed-resolution layout: the same
                                        model class with a Gemma tokenizer.json
                                        (BPE with byte fallback, <bos> added)
  tests/fixtures/siglip-tokenizer-cases.json.gz
                                        >= 1,000 strings and both tokenizers' ids

Each model folder has reference.json / reference.safetensors as the CLIP
fixtures do (token ids, pixels, features, embeddings, logits), plus the family.

Usage: .venv-ref/bin/python scripts/reference/make_siglip_fixtures.py
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, GemmaTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import FIXTURES, TEXTS, gz_write, load_photo, resolve_photos, save_reference, tokenizer_cases  # noqa: E402

CASE_SEED = 11
CONTEXT = 64


def corpus() -> list[str]:
    """Training text for the tokenizers: the CLIP tokenizer cases of another seed, so the test cases are unseen."""
    return tokenizer_cases(seed=CASE_SEED, count=3000) + TEXTS


def train_unigram(out: Path) -> Path:
    """A SentencePiece Unigram model laid out as SigLIP's: pad 0, eos 1, unk 2, no bos, nmt_nfkc."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=1000,
        hard_vocab_limit=False,
        character_coverage=0.995,
        normalization_rule_name="nmt_nfkc",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    path = out / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def train_gemma(out: Path) -> GemmaTokenizer:
    """A Gemma-style tokenizer: BPE with byte fallback over spaces turned into ▁, <bos> first."""
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok = Tokenizer(BPE(fuse_unk=True, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = BpeTrainer(vocab_size=900, special_tokens=special + bytes_, show_progress=False, min_frequency=2)
    tok.train_from_iterator(corpus(), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    gemma = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=True)
    gemma.model_max_length = CONTEXT
    gemma.save_pretrained(out)
    # SigLIP 2 pads on the right to a fixed length and pools the last position;
    # Gemma's class default is the left, so the config says so.
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["padding_side"] = "right"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The reference is what a user gets loading the folder.
    return AutoTokenizer.from_pretrained(out)


MODELS = {
    # SigLIP as google/siglip-base-patch16-224 is laid out (spiece.model), small.
    "siglip-tiny": {
        "text_config": {"hidden_size": 32, "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "max_position_embeddings": CONTEXT},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
        "tokenizer": "spiece",
        "seed": 5,
    },
    # SigLIP 2 fixed resolution (tokenizer.json), other widths, exact gelu, eps, a text
    # projection_size, a longer context, an f16 checkpoint.
    "siglip2-tiny": {
        "text_config": {"hidden_size": 40, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 5,
                        "max_position_embeddings": CONTEXT, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                        "projection_size": 24},
        "vision_config": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                          "num_attention_heads": 3, "image_size": 48, "patch_size": 16, "hidden_act": "gelu",
                          "layer_norm_eps": 1e-5},
        "tokenizer": "gemma",
        "dtype": torch.float16,
        "seed": 6,
    },
}


def make_model(name: str, spec: dict, photos: list[str], tokenizers: dict) -> None:
    out = FIXTURES / "models" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer, files = tokenizers[spec["tokenizer"]]
    for f in files:
        if f.name == "spiece.model":
            # Big (the normaliser's character map); the tests un-gzip it.
            gz_write(out / "spiece.model.gz", f.read_bytes())
        else:
            shutil.copy(f, out / f.name)
    torch.manual_seed(spec["seed"])
    text_config = dict(spec["text_config"], vocab_size=len(tokenizer))
    text_config["pad_token_id"] = tokenizer.pad_token_id
    text_config["eos_token_id"] = tokenizer.eos_token_id
    text_config["bos_token_id"] = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
    config = SiglipConfig(text_config=text_config, vision_config=spec["vision_config"])
    model = SiglipModel(config).eval()
    with torch.no_grad():
        # SigLIP initialises the scale and bias at log(10) and -10; random values test more.
        model.logit_scale.fill_(1.7)
        model.logit_bias.fill_(-3.5)
    dtype = spec.get("dtype", torch.float32)
    model.to(dtype).save_pretrained(out / "_ckpt", safe_serialization=True)
    shutil.copy(out / "_ckpt" / "config.json", out / "config.json")
    gz_write(out / "model.safetensors.gz", (out / "_ckpt" / "model.safetensors").read_bytes())
    shutil.rmtree(out / "_ckpt")
    model = model.float()

    size = spec["vision_config"]["image_size"]
    processor = SiglipImageProcessor(size={"height": size, "width": size})
    processor.save_pretrained(out)
    images = [load_photo(p) for p in photos]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]

    padded = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
    with torch.no_grad():
        full = model(input_ids=padded["input_ids"], pixel_values=pixels)
        text_features = model.get_text_features(input_ids=padded["input_ids"]).pooler_output
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
    save_reference(out, model, padded["input_ids"], pixels, full, text_features, image_features)
    meta = {
        "family": "siglip",
        "texts": TEXTS,
        "token_ids": padded["input_ids"].tolist(),
        "photos": photos,
        "reference": "transformers %s SiglipModel, %s, torch %s, CPU, float32" % (
            __import__("transformers").__version__, type(tokenizer).__name__, torch.__version__),
    }
    (out / "reference.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    print(f"{name}: {sum(f.stat().st_size for f in out.iterdir()) / 1e3:.0f} kB")


def main() -> None:
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    spiece = train_unigram(work)
    SiglipTokenizer(vocab_file=str(spiece)).save_pretrained(work / "siglip")
    siglip_tok = AutoTokenizer.from_pretrained(work / "siglip")
    assert type(siglip_tok).__name__ == "SiglipTokenizer", type(siglip_tok)
    gemma_dir = work / "gemma"
    gemma = train_gemma(gemma_dir)
    tokenizers = {
        "spiece": (siglip_tok, [spiece] + [work / "siglip" / n for n in ("tokenizer_config.json", "special_tokens_map.json")
                                            if (work / "siglip" / n).exists()]),
        "gemma": (gemma, [p for p in gemma_dir.iterdir() if p.name != "tokenizer.json"] + [gemma_dir / "tokenizer.json"]),
    }
    photos = resolve_photos()
    for name, spec in MODELS.items():
        make_model(name, spec, photos, tokenizers)

    cases = tokenizer_cases()
    extra = [
        "red </s> blue", "</s>", "<unk>", "a <unk> b", "▁lead▁ing", "trailing </s>", "Σίσυφος ΟΔΟΣ", "İstanbul ǅemal",
        "\x1c\x1dsep\x1e\x1f", "‘curly’ “quotes” — dashes…", "a\u0085b\u2028c\u2029d", "x" * 500,
    ]
    cases = cases + extra
    record = {"cases": cases}
    for key, (tok, _) in tokenizers.items():
        record[key] = tok(cases, padding="max_length", truncation=True, max_length=CONTEXT)["input_ids"]
    gz_write(FIXTURES / "siglip-tokenizer-cases.json.gz", json.dumps(record, ensure_ascii=False).encode())
    shutil.rmtree(work)
    print(f"{len(cases)} tokenizer cases")


if __name__ == "__main__":
    main()
