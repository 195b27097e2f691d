#!/usr/bin/env python3
"""Generates the open_clip reference fixtures clipdex's numerical tests compare against.

Everything comes from the reference implementation (open_clip's CLIP class, its
SimpleTokenizer and its eval image transform), on CPU with fixed seeds and random
weights. No hub access is needed: the OpenAI BPE ships in open-clip-torch.

  tests/fixtures/models/openclip-vit-tiny/     open_clip hub layout: open_clip_config.json
                                               ({"model_cfg", "preprocess_cfg"}),
                                               open_clip_model.safetensors and merges.txt
                                               (gzipped, as the big files of every fixture;
                                               the other folders have no tokenizer file);
                                               ViT towers, exact GELU, OpenAI preprocessing
  tests/fixtures/models/openclip-vit-options/  the ViT options open_clip adds: average
                                               pooling with LayerNorm after it, no ln_pre,
                                               a text projection with bias, no causal mask,
                                               mlp_ratio 2, QuickGELU, squash resize with
                                               bilinear filter, 0.5 mean and std
  tests/fixtures/models/openclip-rn-tiny/      ModifiedResNet (RN50-style) image tower,
                                               weights as open_clip_pytorch_model.bin
                                               (a PyTorch pickle) instead of safetensors
  tests/fixtures/models/openclip-rn-wide/      ModifiedResNet with other depths, width,
                                               head width and input size
  tests/fixtures/models/openclip-xlmr-tiny/    open_clip's multilingual layout (as
                                               xlm-roberta-base-ViT-B-32): a ViT image tower
                                               and a Hugging Face XLM-RoBERTa text tower
                                               (HFTextEncoder: mean pooling over the
                                               attention mask, an MLP projection); its
                                               open_clip_config.json names the text model as
                                               the hub id clipdex-fixtures/xlm-roberta-tiny,
                                               and reference.json adds tokenizer cases
  tests/fixtures/hub/clipdex-fixtures--xlm-roberta-tiny/
                                               that text model's hub repository files
                                               (config.json, tokenizer.json gzipped,
                                               tokenizer_config.json): a random XLMRobertaConfig
                                               and a SentencePiece Unigram model trained here,
                                               converted to XLMRobertaTokenizer's layout
                                               (<s> 0, <pad> 1, </s> 2, <unk> 3, pieces shifted
                                               by one, <mask> last); the tests build a hub
                                               cache from it
  tests/fixtures/open-clip-tokenizer-cases.json.gz
                                               the CLIP tokenizer cases plus strings that
                                               exercise open_clip's cleaning (ftfy.fix_text,
                                               html.unescape twice, whitespace, lower case),
                                               with their ids and a flag for the mojibake
                                               ones ftfy repairs

Each model folder has reference.json / reference.safetensors as the other fixtures
do (token ids, pixels, features, embeddings, logits), with "layout": "open_clip".
Every BatchNorm gets random running statistics and affine parameters, and every
LayerNorm and zero-initialised bias random values, so folding and biases are
exercised. Weights are rounded to 9 significant bits (one more than bfloat16
keeps), which is what lets the gzipped checkpoints stay small. The XLM-RoBERTa
tower's linear biases (zero in transformers' init) are random too.

Usage: .venv-ref/bin/python scripts/reference/make_open_clip_fixtures.py
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import ftfy
import open_clip
import sentencepiece as spm
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder, MeanPooler
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import image_transform
from open_clip.transformer import QuickGELU
from safetensors.torch import save as save_safetensors
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402
    FIXTURES, TEXTS, gz_write, load_photo, openai_vocab, resolve_photos, save_reference, tokenizer_cases,
)

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
OPENAI_PREPROCESS = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
TEXT = {"context_length": 77, "vocab_size": 49408}

MODELS = {
    # The plain ViT-B/32 shape, tiny, exact GELU (quick_gelu absent, as in LAION's configs).
    "openclip-vit-tiny": {
        "model_cfg": {
            "embed_dim": 48,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": dict(TEXT, width=64, heads=2, layers=2),
        },
        "preprocess_cfg": OPENAI_PREPROCESS,
        "weights": "safetensors",
        "merges": True,
        "seed": 21,
    },
    # Options open_clip's ViT and text towers take that OpenAI's CLIP has no word for.
    "openclip-vit-options": {
        "model_cfg": {
            "embed_dim": 64,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 96, "layers": 3, "head_width": 32,
                           "pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True},
            "text_cfg": dict(TEXT, width=96, heads=3, layers=2, mlp_ratio=2.0, proj_bias=True,
                             no_causal_mask=True),
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                           "resize_mode": "squash"},
        "weights": "safetensors",
        "seed": 22,
    },
    # RN50's layout (3-conv stem, anti-aliased bottlenecks, attention pool), tiny: the
    # feature width is 32x `width`, so width 8 (256 features, 8 heads of 32) keeps the
    # checkpoint under a megabyte. Shipped as a pickle.
    "openclip-rn-tiny": {
        "model_cfg": {
            "embed_dim": 48,
            "quick_gelu": True,
            "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 64, "head_width": 32},
            "text_cfg": dict(TEXT, width=64, heads=2, layers=2),
        },
        "preprocess_cfg": OPENAI_PREPROCESS,
        "weights": "pickle",
        "seed": 23,
    },
    # Two blocks in some stages, a 3x3 attention-pool grid (96 px), 384 features in
    # 6 heads of 64, a one-layer text tower with 4 heads.
    "openclip-rn-wide": {
        "model_cfg": {
            "embed_dim": 64,
            "quick_gelu": True,
            "vision_cfg": {"layers": [2, 1, 2, 1], "width": 12, "image_size": 96, "head_width": 64},
            "text_cfg": dict(TEXT, width=64, heads=4, layers=1),
        },
        "preprocess_cfg": OPENAI_PREPROCESS,
        "weights": "safetensors",
        "seed": 24,
    },
}

MANTISSA_BITS = 8


def round_mantissa(t: torch.Tensor, bits: int = MANTISSA_BITS) -> torch.Tensor:
    """Rounds f32 values to `bits` explicit mantissa bits (nearest, ties away), so gzip finds zero bytes."""
    drop = 23 - bits
    i = t.detach().float().contiguous().view(torch.int32)
    i = ((i + (1 << (drop - 1))) >> drop) << drop
    return i.view(torch.float32)


def open_clip_ids(tok: SimpleTokenizer, texts: list[str], context: int = 77) -> list[list[int]]:
    """Unpadded ids, as SimpleTokenizer.__call__ builds them before padding: sot, text, eot, truncated."""
    rows = []
    for text in texts:
        ids = [tok.sot_token_id] + tok.encode(text) + [tok.eot_token_id]
        if len(ids) > context:
            ids = ids[:context]
            ids[-1] = tok.eot_token_id
        rows.append(ids)
    padded = tok(texts, context_length=context)
    for row, ids in zip(padded.tolist(), rows):
        assert row == ids + [0] * (context - len(ids)), (row, ids)
    return rows


def randomise(model: CLIP, seed: int) -> None:
    """Random values where open_clip initialises constants: BatchNorm, LayerNorm, zero biases; logit scale 1/0.07."""
    g = torch.Generator().manual_seed(seed)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                normal(module.running_mean, 0.1)
                uniform(module.running_var, 0.5, 1.5)
                uniform(module.weight, 0.5, 1.5)
                normal(module.bias, 0.1)
            elif isinstance(module, nn.LayerNorm):
                uniform(module.weight, 0.5, 1.5)
                normal(module.bias, 0.1)
            elif isinstance(module, nn.MultiheadAttention):
                normal(module.in_proj_bias, 0.05)
                normal(module.out_proj.bias, 0.05)
        if isinstance(model.text_projection, nn.Linear) and model.text_projection.bias is not None:
            normal(model.text_projection.bias, 0.05)
        model.logit_scale.fill_(math.log(1 / 0.07))
        stats = [b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
        for t in list(model.parameters()) + stats:
            if t.numel() > 1:  # the logit scale stays exact
                t.copy_(round_mantissa(t))


def check_options(name: str, model: CLIP, cfg: dict) -> None:
    """Asserts that open_clip built what the config asks for."""
    text, vision = cfg["text_cfg"], cfg["vision_cfg"]
    act = QuickGELU if cfg.get("quick_gelu") else nn.GELU
    acts = [type(m) for m in model.modules() if isinstance(m, (QuickGELU, nn.GELU))]
    assert acts and all(a is act for a in acts), (name, set(acts))
    if not cfg.get("quick_gelu"):
        assert all(m.approximate == "none" for m in model.modules() if isinstance(m, nn.GELU))
    assert model.transformer.resblocks[0].mlp.c_fc.out_features == int(text["width"] * text.get("mlp_ratio", 4.0))
    assert model.transformer.resblocks[0].attn.num_heads == text["heads"]
    if text.get("proj_bias"):
        assert isinstance(model.text_projection, nn.Linear) and model.text_projection.bias is not None
    else:
        assert isinstance(model.text_projection, nn.Parameter)
    if text.get("no_causal_mask"):
        assert model.attn_mask is None
    else:
        assert model.attn_mask.shape == (77, 77)
    v = model.visual
    if isinstance(vision["layers"], list):
        assert type(v).__name__ == "ModifiedResNet"
        assert v.attnpool.num_heads == vision["width"] * 32 // vision["head_width"]
    else:
        assert type(v).__name__ == "VisionTransformer"
        assert v.transformer.resblocks[0].attn.num_heads == vision["width"] // vision["head_width"]
        assert v.pool_type == vision.get("pool_type", "tok")
        assert v.final_ln_after_pool == vision.get("final_ln_after_pool", False)
        assert isinstance(v.ln_pre, nn.Identity) == vision.get("no_ln_pre", False)
        assert v.attn_pool is None


def describe(model: CLIP) -> str:
    return "\n".join(f"  {k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                     for k, v in model.state_dict().items())


def make_model(name: str, spec: dict, tok: SimpleTokenizer, merges_gz: bytes, photos: list[str]) -> None:
    out = FIXTURES / "models" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg, pp = spec["model_cfg"], spec["preprocess_cfg"]
    torch.manual_seed(spec["seed"])
    model = CLIP(**cfg).eval()
    check_options(name, model, cfg)
    randomise(model, spec["seed"] + 1000)

    ids = open_clip_ids(tok, TEXTS, cfg["text_cfg"]["context_length"])
    padded = tok(TEXTS, context_length=cfg["text_cfg"]["context_length"])
    used = sorted({i for row in padded.tolist() for i in row})
    with torch.no_grad():
        # Rows of the token table that no fixture text looks up (padding included)
        # are zeroed, so the gzipped checkpoint stays small; they never reach an output.
        emb = model.token_embedding.weight
        keep = emb[used].clone()
        emb.zero_()
        emb[used] = keep

    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if spec["weights"] == "pickle":
        with tempfile.TemporaryDirectory() as tmp:
            # Saved under its real name: torch names the archive's top folder after the file.
            path = Path(tmp) / "open_clip_pytorch_model.bin"
            torch.save(state, path)
            gz_write(out / "open_clip_pytorch_model.bin.gz", path.read_bytes())
    else:
        gz_write(out / "open_clip_model.safetensors.gz", save_safetensors(state, metadata={"format": "pt"}))
    if spec.get("merges"):
        # The others bring no tokenizer, as timm/*_clip.openai repositories: clipdex uses its built-in copy.
        (out / "merges.txt.gz").write_bytes(merges_gz)

    size = cfg["vision_cfg"]["image_size"]
    transform = image_transform(size, is_train=False, mean=pp["mean"], std=pp["std"],
                                resize_mode=pp["resize_mode"], interpolation=pp["interpolation"])
    pixels = torch.stack([transform(load_photo(p)) for p in photos])
    with torch.no_grad():
        text_features = model.encode_text(padded)
        image_features = model.encode_image(pixels)
        text_embeds = model.encode_text(padded, normalize=True)
        image_embeds = model.encode_image(pixels, normalize=True)
        logits_per_image, _ = model.get_logits(pixels, padded)
        manual = model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
        assert torch.allclose(logits_per_image, manual, atol=1e-5)
    full = SimpleNamespace(text_embeds=text_embeds, image_embeds=image_embeds, logits_per_image=logits_per_image)
    save_reference(out, model, padded, pixels, full, text_features, image_features)
    meta = {
        "family": "clip",
        "layout": "open_clip",
        "texts": TEXTS,
        "token_ids": ids,
        "photos": photos,
        "reference": "open_clip %s CLIP, torch %s, CPU, float32" % (open_clip.__version__, torch.__version__),
    }
    (out / "reference.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    check_roundtrip(out, model, padded, pixels, photos, text_features, image_features)

    print(f"{name}: {sum(f.stat().st_size for f in out.iterdir()) / 1e3:.0f} kB "
          f"({', '.join(f'{f.name} {f.stat().st_size / 1e3:.0f} kB' for f in sorted(out.iterdir()))}); "
          f"|text features| max {text_features.abs().max():.3g}, |image features| max {image_features.abs().max():.3g}")
    print(f"{name} state_dict:\n{describe(model)}")


def check_roundtrip(out: Path, model, padded, pixels, photos, text_features, image_features) -> None:
    """Loads the folder as open_clip loads a hub checkpoint ("local-dir:") and checks it gives the same outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f in out.iterdir():
            if f.name.startswith("reference"):
                continue
            if f.suffix == ".gz":
                (tmp / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
            else:
                shutil.copy(f, tmp / f.name)
        loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}")
        loaded.eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
        assert torch.equal(tokenizer(TEXTS), padded)
        assert type(loaded) is CLIP
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        again = torch.stack([preprocess(load_photo(p)) for p in photos])
        assert torch.equal(again, pixels), "the config's preprocess_cfg gives other pixels"
        with torch.no_grad():
            assert torch.equal(loaded.encode_text(padded), text_features)
            assert torch.equal(loaded.encode_image(pixels), image_features)


# Strings for open_clip's cleaning: ftfy.fix_text (HTML unescaping only where a line
# has no "<", terminal escapes, ligatures, character width, curly quotes, line breaks,
# control characters, NFC, mojibake), html.unescape twice, whitespace, lower case.
CLEANING_CASES = [
    # HTML entities
    "&amp", "&amp;", "&amp x", "&ampx", "fish &amp chips", "&copy2", "&copy;2024", "&COPY;", "&Copy;",
    "&#233;", "&#xe9;", "&#XE9;", "&#x00E9;", "&#128512;", "&#x1F600;", "&#0;", "&#x80;", "&#x81;", "&#150;",
    "&#x9f;", "&#1114111;", "&#1114112;", "&#xD800;", "&#65;&#66;&#67;", "&#99999999999;",
    "&amp;amp;", "&amp;amp;amp;", "&amp;lt;b&amp;gt;", "&amp;#233;", "&lt;b&gt;bold&lt;/b&gt;",
    "&EACUTE;", "P&EACUTE;REZ", "BUNDESSTRA&SZLIG;E", "&ntilde; &Ntilde; &NTILDE; &nTILDE;", "&AMP;", "&LT;b&GT;",
    "&Jscr;ohn &HilbertSpace;ancock", "&checkmark;", "this&not that", "&notit; &notin;", "&nbsp;x&nbsp;", "&NBSP;",
    "&hellip;&mdash;&ndash;&lsquo;&rsquo;&ldquo;&rdquo;", "&frac12; &sup2; &micro; &deg;", "&zwnj;&zwj;",
    "&unknownentity;", "& amp;", "&;", "&#;", "&#x;", "&", "&&&", "a&b", "AT&T", "R&amp;D",
    # "<" turns ftfy's unescaping off for that line (and, in fix_text, for every line after it)
    "<b>&eacute;</b>", "<P&EACUTE;REZ>", "x < y &amp; z", "a <&EACUTE;", "1 < 2 &EACUTE;", "<&amp;amp;>",
    "P&EACUTE;REZ\nx < y", "x < y\nP&EACUTE;REZ", "&EACUTE;\n&EACUTE; <\n&EACUTE;", "< &lt; &amp;lt;",
    # ligatures
    "ﬁ ﬂ ﬀ ﬃ ﬄ ﬅ ﬆ", "ĳ Ĳ", "Ǳ ǲ ǳ Ǆ ǅ ǆ Ǉ ǈ ǉ Ǌ ǋ ǌ", "oﬃce ﬂoor", "ŉ ʼn", "Æ æ Œ œ ß ẞ",
    # character width
    "ＡＢＣ ａｂｃ １２３ ！？", "ｱｲｳ ｶﾞ ﾊﾟ ﾞ ﾟ", "ｶﾞｷﾞｸﾞ", "　full　width　space", "￥ ￦ ￠ ￡", "ﾠ", "ｧｨｩ",
    # quotes and primes
    "‘single’ ‚low‛ “double” „low‟", "it’s don’t", "′ ″ ‴ ‵ ‶ ‷ ʹ ʺ", "«guillemets» ‹single›", "＂ ＇", "〝〞",
    # line breaks
    "a\r\nb", "a\rb", "a\r\rb", "a\n\rb", "a\u2028b", "a\u2029b", "a\u0085b", "a\x0bb", "a\x0cb",
    "line one\r\nline two\rline three\nline four", "\n\nleading and trailing\n\n",
    # control characters
    "".join(chr(c) for c in range(0x20)) + "visible", "a\x00b\x01c\x02d", "del\x7fete", "tab\there",
    "".join(chr(c) for c in range(0x80, 0xA0)) + "c1", "c1\x80\x85\x9f", "zero\u200bwidth", "\ufeffbom", "x\ufeffy",
    "\u206ainhibit\u206f", "soft\u00adhyphen", "\u200e\u200fmarks\u202a\u202e", "\ufff9\ufffa\ufffb", "\ufffc\ufffd",
    "\U000e0001\U000e0041tag", "\ud7ff\ue000\uf8ff", "\U0010fffd",
    # terminal escapes
    "\x1b[31mred\x1b[0m", "\x1b[1;32;40mbold green\x1b[m", "\x1b]0;title\x07text", "\x1b[?25l", "esc\x1bape",
    # Python whitespace that is not Unicode White_Space
    "a\x1cb\x1dc\x1ed\x1fe", "\x1c\x1d\x1e\x1f", "x \x1c y", "sep\x1c",
    # Unicode whitespace
    "a\u00a0b\u1680c\u2000d\u2001e\u2002f\u2003g\u2004h\u2005i\u2006j\u2007k\u2008l\u2009m\u200an\u202fo\u205fp\u3000q",
    "\u180emongolian", "\t\n\x0b\x0c\r ",
    # special tokens, literal
    "<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "<Start_Of_Text>", "<|endoftext|>", "<|startoftext|>",
    "x<end_of_text>y", "!<start_of_text>", "..<end_of_text>..", "<start_of_text><end_of_text>", "<start_of_text >",
    "a <end_of_text> b <start_of_text> c", "<end_of_text!>", "&lt;end_of_text&gt;", "＜end_of_text＞",
    "<start_of_text>" * 40,
    # combining marks, case
    "e\u0301 a\u0300 o\u0302 n\u0303", "\u0301\u0301 leading marks", "q\u0307\u0323", "Å Å Å", "한 한",
    "ΟΔΟΣ", "ΟΔΟΣ ΣΟΦΟΣ", "Σ", "ΑΣ.", "İstanbul", "ISTANBUL ı İ", "ǅemal", "ẞ STRASSE", "ᾼ ᾳ", "ﬅ",
    "K Å Ω", "Ⅻ ⅻ", "Ⓐⓑ", "𝐀𝐁𝐂 𝒜", "Ꭰ ꭰ",
]

# Encoding mix-ups ftfy.fix_text repairs (or, for some, leaves): UTF-8 read as
# Windows-1252 or Latin-1, once or twice.
MOJIBAKE_CASES = [
    "Ã©tÃ©", "â€œquotedâ€\x9d", "CafÃ©", "naÃ¯ve", "Ã¼ber", "SÃ£o Paulo", "piÃ±ata", "donâ€™t", "itâ€™s great",
    "â€”dashâ€”", "Ã‰cole", "ZÃ¼rich", "Ã…ngstrÃ¶m", "crÃ¨me brÃ»lÃ©e", "æ—¥æœ¬èªž", "ðŸ˜€ smile", "â‚¬5",
    "Â£10", "10Â°C", "Â½ cup", "Ã\xa0 la carte", "ÃƒÂ©", "Ð¿Ñ€Ð¸Ð²ÐµÑ‚", "Ã¡rbol", "seÃ±or GarcÃ\xada",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", "Ã©" * 30,
]


def make_tokenizer_cases(tok: SimpleTokenizer) -> None:
    cases = tokenizer_cases() + CLEANING_CASES + MOJIBAKE_CASES
    ids = open_clip_ids(tok, cases)
    mojibake = [ftfy.fix_encoding(c) != c for c in cases]
    record = {"cases": cases, "ids": ids, "mojibake": mojibake,
              # What the cleaning (before BPE) made of each case, to tell cleaning from BPE faults.
              "clean": [tok.clean_fn(c) for c in cases]}
    data = json.dumps(record, ensure_ascii=False).encode()
    gz_write(FIXTURES / "open-clip-tokenizer-cases.json.gz", data)
    unfixed = [c for c in MOJIBAKE_CASES if ftfy.fix_encoding(c) == c]
    print(f"open-clip-tokenizer-cases.json.gz: {len(cases)} cases, {sum(mojibake)} mojibake "
          f"({sum(mojibake[:len(cases) - len(CLEANING_CASES) - len(MOJIBAKE_CASES)])} among the shared cases, "
          f"{len(MOJIBAKE_CASES) - len(unfixed)} of {len(MOJIBAKE_CASES)} deliberate ones; "
          f"left as they are: {unfixed!r}), "
          f"{(FIXTURES / 'open-clip-tokenizer-cases.json.gz').stat().st_size / 1e3:.0f} kB")


# open_clip's multilingual layout (xlm-roberta-base-ViT-B-32 and its kin): a ViT image
# tower and a Hugging Face XLM-RoBERTa text tower through HFTextEncoder. The text model
# is a hub repository of its own (config.json, tokenizer), named by id in the config.

XLMR_HUB_ID = "clipdex-fixtures/xlm-roberta-tiny"
XLMR_HUB_DIR = FIXTURES / "hub" / XLMR_HUB_ID.replace("/", "--")
# The tokenizer's training corpus: tokenizer cases of a seed that neither the shared
# cases (7) nor the SigLIP corpus (11) use, so the cases in reference.json are unseen.
XLMR_CORPUS_SEED = 13
XLMR_CASES = 300
MULTILINGUAL_TEXTS = [
    "Ein Hund läuft über die Straße, große Äpfel",
    "一只猫坐在窗台上",
    "قطة تجلس على النافذة",
    "एक बिल्ली खिड़की पर बैठी है",
    "🐱🐶 ein Foto 📷✨ 👍🏽",
    "Привет, мир! カメラ 写真",
]
XLMR_TEXTS = TEXTS + MULTILINGUAL_TEXTS

HF_MODELS = {
    # The text_cfg of open_clip's xlm-roberta-base-ViT-B-32.json, with the defaults it
    # leaves out written down (an MLP projection; no pretrained text weights to fetch);
    # the text model, random and tiny, as XLMRobertaModel (no pooler layer: mean pooling).
    "openclip-xlmr-tiny": {
        "model_cfg": {
            "embed_dim": 48,
            "vision_cfg": {"image_size": 40, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"hf_model_name": XLMR_HUB_ID, "hf_tokenizer_name": XLMR_HUB_ID,
                         "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp", "hf_model_pretrained": False},
        },
        "preprocess_cfg": OPENAI_PREPROCESS,
        # XLM-RoBERTa numbers positions from pad + 1 = 2, so 77 tokens need 79 rows.
        # initializer_range 0.1 (transformers' 0.02 leaves a 64-wide model's attention
        # almost uniform).
        "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 128, "max_position_embeddings": 80, "type_vocab_size": 1,
                        "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "layer_norm_eps": 1e-5,
                        "hidden_act": "gelu", "initializer_range": 0.1},
        "seed": 25,
    },
}


def train_xlmr_spm(out: Path) -> Path:
    """A SentencePiece Unigram model laid out as XLM-R's sentencepiece.bpe.model: unk 0, bos 1, eos 2, no pad,
    nmt_nfkc."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_cases(seed=XLMR_CORPUS_SEED, count=3000) + XLMR_TEXTS),
        model_writer=model,
        model_type="unigram",
        vocab_size=1500,
        hard_vocab_limit=False,
        # The rarest characters (some of the CJK, Cyrillic, emoji) stay out, so <unk>
        # runs come up in the texts and in a few of the cases.
        character_coverage=0.9995,
        normalization_rule_name="nmt_nfkc",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    path = out / "sentencepiece.bpe.model"
    path.write_bytes(model.getvalue())
    return path


def spm_xlmr_ids(sp: spm.SentencePieceProcessor, text: str, context: int = 77) -> list[int]:
    """Ids as fairseq and transformers 4's slow XLMRobertaTokenizer made them from the sentencepiece
    library: <s> 0, <pad> 1, </s> 2, <unk> 3, every other piece one up; truncated before <s> and </s>."""
    pieces = sp.encode(text)
    assert not {1, 2} & set(pieces), text
    return [0] + [3 if i == 0 else i + 1 for i in pieces][:context - 2] + [2]


def make_xlmr_text_model(work: Path, spec: dict) -> Path:
    """The text model's hub repository in `work`: tokenizer files and config.json. Checks the tokenizers agree."""
    spm_dir = work / "spm"
    spm_dir.mkdir()
    sp = spm.SentencePieceProcessor(model_file=str(train_xlmr_spm(spm_dir)))
    # transformers converts the .model as XLMRobertaConverter lays XLM-R's out.
    converted = XLMRobertaTokenizer.from_pretrained(spm_dir)
    assert len(converted) == len(sp) + 2 and converted.convert_ids_to_tokens([0, 1, 2, 3, len(sp) + 1]) == [
        "<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    hf_dir = work / "xlm-roberta-tiny"
    converted.save_pretrained(hf_dir)
    # transformers writes the keys it was loaded with (local paths, flags); this is what
    # a hub repository has.
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "XLMRobertaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "mask_token": "<mask>", "add_prefix_space": True, "model_max_length": 77,
    }, indent=2) + "\n")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert type(tok) is XLMRobertaTokenizer and len(tok) == len(converted)
    saved = sorted(p.name for p in hf_dir.iterdir())
    assert saved == ["tokenizer.json", "tokenizer_config.json"], saved

    config = XLMRobertaConfig(**spec["text_config"], vocab_size=len(tok))
    config.save_pretrained(hf_dir)

    # The tokenizer.json clipdex reads (on the tokenizers library) and what transformers
    # makes of the folder, against the sentencepiece library, on open_clip's cleaned
    # text, untruncated. The two Unigram implementations can break exact ties (the same
    # pieces in another order, so the same score) differently; the reference is
    # transformers'.
    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    cleaner = HFTokenizer(str(hf_dir)).clean_fn
    texts = XLMR_TEXTS + tokenizer_cases(count=XLMR_CASES) + tokenizer_cases(seed=XLMR_CORPUS_SEED, count=3000)
    texts = [cleaner(t) for t in texts]
    fast = [e.ids for e in raw.encode_batch(texts)]
    slow = [spm_xlmr_ids(sp, t, context=10 ** 6) for t in texts]
    assert tok(texts, verbose=False)["input_ids"] == fast
    score = lambda ids: sum(sp.GetScore(i - 1) for i in ids if i > 3)  # noqa: E731
    ties = {t for t, f, s in zip(texts, fast, slow) if f != s}
    for t, f, s in zip(texts, fast, slow):
        assert f == s or (sorted(f) == sorted(s) and score(f) == score(s)), (t, f, s)
    unk = sum(3 in f for f in fast)
    print(f"{XLMR_HUB_ID}: {len(tok)} tokens; the tokenizer.json, transformers and sentencepiece agree on "
          f"{len(texts)} texts ({unk} with <unk>)" + (f", but for ties in {sorted(ties)!r}" if ties else ""))
    return hf_dir


def hf_open_clip_ids(tok: HFTokenizer, texts: list[str], context: int = 77) -> tuple[torch.Tensor, list[list[int]]]:
    """HFTokenizer's padded ids and, per text, the unpadded ones: up to the first </s>, the attention mask's count."""
    padded = tok(texts, context_length=context)
    enc = tok.tokenizer([tok.clean_fn(t) for t in texts], max_length=context, padding="max_length",
                        truncation=True, return_tensors="pt")
    assert torch.equal(enc.input_ids, padded)
    rows = []
    for row, mask in zip(padded.tolist(), enc.attention_mask.tolist()):
        n = row.index(2) + 1
        assert row[0] == 0 and n == sum(mask) and mask == [1] * n + [0] * (context - n), (row, mask)
        assert row[n:] == [1] * (context - n) and 1 not in row[:n], row
        rows.append(row[:n])
    return padded, rows


def randomise_hf(model: CustomTextCLIP, seed: int) -> None:
    """randomise() for a CustomTextCLIP: LayerNorm, attention and the text tower's linear biases, logit scale 1/0.07."""
    g = torch.Generator().manual_seed(seed)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    def uniform(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                uniform(module.weight, 0.5, 1.5)
                normal(module.bias, 0.1)
            elif isinstance(module, nn.MultiheadAttention):
                normal(module.in_proj_bias, 0.05)
                normal(module.out_proj.bias, 0.05)
        for module in model.text.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                normal(module.bias, 0.05)
        model.logit_scale.fill_(math.log(1 / 0.07))
        for t in model.parameters():
            if t.numel() > 1:
                t.copy_(round_mantissa(t))


def check_hf_options(name: str, model: CustomTextCLIP, cfg: dict, config: XLMRobertaConfig) -> None:
    """Asserts that open_clip built the towers the config asks for."""
    text, vision = model.text, model.visual
    assert type(model) is CustomTextCLIP and isinstance(text, HFTextEncoder), name
    assert type(text.transformer) is XLMRobertaModel and text.transformer.pooler is None
    assert type(text.pooler) is MeanPooler
    width, embed = config.hidden_size, cfg["embed_dim"]
    proj = text.proj
    assert [type(m) for m in proj] == [nn.Linear, nn.GELU, nn.Linear] and proj[1].approximate == "none"
    assert (proj[0].in_features, proj[0].out_features, proj[2].out_features) == (width, (width + embed) // 2, embed)
    assert proj[0].bias is None and proj[2].bias is None
    assert text.config.pad_token_id == 1 and text.context_length == config.max_position_embeddings
    v = cfg["vision_cfg"]
    assert type(vision).__name__ == "VisionTransformer" and vision.pool_type == "tok" and vision.attn_pool is None
    assert vision.transformer.resblocks[0].attn.num_heads == v["width"] // v["head_width"]
    acts = {type(m) for m in vision.modules() if isinstance(m, (QuickGELU, nn.GELU))}
    assert acts == {nn.GELU} and all(m.approximate == "none" for m in vision.modules() if isinstance(m, nn.GELU))


def make_hf_model(name: str, spec: dict, photos: list[str]) -> None:
    out = FIXTURES / "models" / name
    for d in (out, XLMR_HUB_DIR):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    cfg, pp = spec["model_cfg"], spec["preprocess_cfg"]
    with tempfile.TemporaryDirectory() as work:
        hf_dir = make_xlmr_text_model(Path(work), spec)
        # The hub repository's files; the big ones gzipped.
        for f in sorted(hf_dir.iterdir()):
            if f.stat().st_size > 100_000:
                gz_write(XLMR_HUB_DIR / (f.name + ".gz"), f.read_bytes())
            else:
                shutil.copy(f, XLMR_HUB_DIR / f.name)
        config = XLMRobertaConfig.from_pretrained(hf_dir)
        local = json.loads(json.dumps(cfg))
        local["text_cfg"].update(hf_model_name=str(hf_dir), hf_tokenizer_name=str(hf_dir))
        torch.manual_seed(spec["seed"])
        model = CustomTextCLIP(**local).eval()
        check_hf_options(name, model, cfg, config)
        randomise_hf(model, spec["seed"] + 1000)
        tok = HFTokenizer(str(hf_dir), context_length=77)
        padded, ids = hf_open_clip_ids(tok, XLMR_TEXTS)
        cases = tokenizer_cases(count=XLMR_CASES)
        _, case_ids = hf_open_clip_ids(tok, cases)

    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    gz_write(out / "open_clip_model.safetensors.gz", save_safetensors(state, metadata={"format": "pt"}))

    size = cfg["vision_cfg"]["image_size"]
    transform = image_transform(size, is_train=False, mean=pp["mean"], std=pp["std"],
                                resize_mode=pp["resize_mode"], interpolation=pp["interpolation"])
    pixels = torch.stack([transform(load_photo(p)) for p in photos])
    with torch.no_grad():
        text_features = model.encode_text(padded)
        image_features = model.encode_image(pixels)
        text_embeds = model.encode_text(padded, normalize=True)
        image_embeds = model.encode_image(pixels, normalize=True)
        logits_per_image, _ = model.get_logits(pixels, padded)
        manual = model.logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
        assert torch.allclose(logits_per_image, manual, atol=1e-5)
        # Mean pooling sees only the attention mask: padding to another length changes nothing.
        short = padded[:, :max(len(r) for r in ids)]
        assert torch.allclose(model.encode_text(short), text_features, atol=1e-5)
    full = SimpleNamespace(text_embeds=text_embeds, image_embeds=image_embeds, logits_per_image=logits_per_image)
    save_reference(out, model, padded, pixels, full, text_features, image_features)
    meta = {
        "family": "clip",
        "layout": "open_clip",
        "texts": XLMR_TEXTS,
        "token_ids": ids,
        "photos": photos,
        "hub": {XLMR_HUB_ID: str(XLMR_HUB_DIR.relative_to(FIXTURES))},
        "tokenizer_cases": cases,
        "tokenizer_ids": case_ids,
        "reference": "open_clip %s CustomTextCLIP (HFTextEncoder on transformers %s XLMRobertaModel, HFTokenizer), "
                     "torch %s, CPU, float32" % (open_clip.__version__, __import__("transformers").__version__,
                                                 torch.__version__),
    }
    (out / "reference.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    check_hub_roundtrip(out)

    for d in (out, XLMR_HUB_DIR):
        print(f"{d.relative_to(FIXTURES)}: {sum(f.stat().st_size for f in d.iterdir()) / 1e3:.0f} kB "
              f"({', '.join(f'{f.name} {f.stat().st_size / 1e3:.1f} kB' for f in sorted(d.iterdir()))})")
    print(f"{name}: |text features| max {text_features.abs().max():.3g}, "
          f"|image features| max {image_features.abs().max():.3g}; text tower "
          f"{type(model.text.transformer).__name__} ({model.text.transformer.config._attn_implementation} attention), "
          f"pooler {type(model.text.pooler).__name__}, proj {model.text.proj}")
    print(f"{name} state_dict:\n{describe(model)}")


def check_hub_roundtrip(out: Path) -> None:
    """Loads the folder as open_clip loads it ("local-dir:", the text model from an offline hub cache
    made of tests/fixtures/hub) in a fresh process, and checks it gives the reference outputs."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, cache = tmp / "model", tmp / "hub"
        repo = cache / ("models--" + XLMR_HUB_ID.replace("/", "--"))
        commit = "0" * 40
        snapshot = repo / "snapshots" / commit
        for src, dst in ((out, model_dir), (XLMR_HUB_DIR, snapshot)):
            dst.mkdir(parents=True)
            for f in src.iterdir():
                if f.name.startswith("reference"):
                    continue
                if f.suffix == ".gz":
                    (dst / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
                else:
                    shutil.copy(f, dst / f.name)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        subprocess.run([sys.executable, __file__, "--check-hub-roundtrip", str(model_dir), str(out)], env=env,
                       check=True)


def hub_roundtrip(model_dir: Path, out: Path) -> None:
    """The child of check_hub_roundtrip."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    ref = load_file(str(out / "reference.safetensors"))
    meta = json.loads((out / "reference.json").read_text())
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    assert type(model) is CustomTextCLIP
    weights = load_file(str(model_dir / "open_clip_model.safetensors"))
    theirs = model.state_dict()
    assert weights.keys() == theirs.keys() and all(torch.equal(weights[k], theirs[k]) for k in weights)
    # get_tokenizer would read a local-dir's own tokenizer files; a hub id is what an
    # hf-hub: checkpoint's tokenizer comes from.
    tok = HFTokenizer(XLMR_HUB_ID)
    assert torch.equal(tok(meta["texts"]), ref["input_ids"])
    for case, ids in zip(meta["tokenizer_cases"], meta["tokenizer_ids"]):
        row = tok(case)[0].tolist()
        assert row == ids + [1] * (77 - len(ids)), case
    pixels = torch.stack([preprocess(load_photo(p)) for p in meta["photos"]])
    assert torch.equal(pixels, ref["pixel_values"]), "the config's preprocess_cfg gives other pixels"
    with torch.no_grad():
        assert torch.equal(model.encode_text(ref["input_ids"]), ref["text_features"])
        assert torch.equal(model.encode_image(pixels), ref["image_features"])
    print(f"{out.name}: open_clip loads it from a hub cache and gives the same outputs")


def main() -> None:
    torch.set_num_threads(1)
    tok = SimpleTokenizer()
    assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407], "vocabulary is off"
    _, merges = openai_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "merges.txt.gz"
        gz_write(path, ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
        merges_gz = path.read_bytes()
    photos = resolve_photos()
    for name, spec in MODELS.items():
        make_model(name, spec, tok, merges_gz, photos)
    for name, spec in HF_MODELS.items():
        make_hf_model(name, spec, photos)
    make_tokenizer_cases(tok)
    print(f"open_clip {open_clip.__version__}, torch {torch.__version__}, ftfy {ftfy.__version__}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check-hub-roundtrip"]:
        hub_roundtrip(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
