#!/usr/bin/env python3
"""ONNX Runtime (fp32, ORT_ENABLE_ALL; and dynamic int8) on the same checkpoint and inputs as
`cargo bench --bench model`.

    python scripts/reference/bench_ort.py --family siglip --dir target/bench/siglip-b-16 [--threads 2] [--json]
        [--int8]
    python scripts/reference/bench_ort.py --family clip --dir target/bench/vit-b-32
    python scripts/reference/bench_ort.py --family open_clip_rn50 --dir target/bench/rn50
    python scripts/reference/bench_ort.py --family open_clip_xlmr --dir target/bench/xlmr-b-32

Exports the image tower (pixels -> image features) and the text tower (ids ->
text features) of the transformers model with torch.onnx, then measures
images/s at batch 1 and 16 and the latency of the 8-word query (tokenizer
included), as bench_model.py does; for CLIP also 32 queries of 1 to 12 words
in one batch padded to the longest (`texts32_ms_p50`), as `cargo bench
--bench model` embeds them. Immich runs CLIP on ONNX Runtime: this is
the strongest CPU peer.

`--int8` also measures the same graphs after ONNX Runtime's dynamic
quantization (`quantize_dynamic`, per-channel int8 weights, activations
quantized per tensor at run time), in the same run, and prints the smallest
cosine between its embeddings and fp32's.
"""

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import sys

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoTokenizer, CLIPModel, SiglipModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

QUERY = "a photo of a dog on the beach"
# 32 queries of 1 to 12 words and a number, as benches/model.rs makes them.
MIXED_WORDS = "red dog old cat small beach bright mountain dark sunset green car".split()
MIXED = [" ".join(MIXED_WORDS[: 1 + i % 12]) + f" {1000 + i}" for i in range(32)]


class Image(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        if hasattr(self.model, "encode_image"):
            return self.model.encode_image(pixels)
        return self.model.get_image_features(pixel_values=pixels).pooler_output


class Text(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        if hasattr(self.model, "encode_text"):
            return self.model.encode_text(ids)
        return self.model.get_text_features(input_ids=ids).pooler_output


def export_image(model, size, path):
    """The image tower (pixels -> image features) as an ONNX graph at `path`, any batch."""
    torch.onnx.export(Image(model), (torch.zeros(1, 3, size, size),), path, input_names=["pixels"],
                      output_names=["features"], dynamic_axes={"pixels": {0: "batch"}}, dynamo=False,
                      opset_version=17)


def quantize(path):
    """ONNX Runtime's dynamic int8 quantization of the graph at `path` (per-channel int8 weights),
    written beside it; returns its path."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    out = path.with_suffix(".int8.onnx")
    # ONNX Runtime's recommended pre-processing (shape inference, graph
    # optimisation): it folds the ResNet's batch norms into its
    # convolutions' weights, which quantize_dynamic needs as initializers.
    # Symbolic shape inference fails on the ResNet's attention pooling
    # reshape; ONNX's own shape inference does not.
    pre = path.with_suffix(".pre.onnx")
    quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(str(pre), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return out


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
    ap.add_argument("--dir", default=None)
    ap.add_argument("--family", choices=["clip", "siglip", "open_clip_rn50", "open_clip_xlmr"], default="clip")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--int8", action="store_true", help="also measure quantize_dynamic's int8 graphs")
    args = ap.parse_args()
    siglip = args.family == "siglip"
    rn50 = args.family == "open_clip_rn50"
    xlmr = args.family == "open_clip_xlmr"
    directory = args.dir or {"siglip": "target/bench/siglip-b-16", "open_clip_rn50": "target/bench/rn50",
                             "open_clip_xlmr": "target/bench/xlmr-b-32"}.get(args.family, "target/bench/vit-b-32")
    if xlmr:
        # open_clip's xlm-roberta-base-ViT-B-32 as bench_model.py writes it: a ViT-B/32 image tower and
        # an XLM-RoBERTa text tower through HFTextEncoder (mean pooling over the non-padding tokens).
        import open_clip
        from safetensors.torch import load_file
        from bench_model import xlmr_cfg

        model = open_clip.model.CustomTextCLIP(**xlmr_cfg(Path(directory))).eval()
        model.load_state_dict(load_file(str(Path(directory) / "open_clip_model.safetensors")))
        hf = open_clip.tokenizer.HFTokenizer(str((Path(directory) / "xlmr-text").resolve()))
        encode = lambda: {"input_ids": hf([QUERY]).numpy()}
        size = 224
    elif rn50:
        # open_clip's RN50 as bench_model.py writes it (prepare it with that script first).
        import open_clip
        from safetensors.torch import load_file
        from bench_model import RN50

        model = open_clip.model.CLIP(**RN50).eval()
        model.load_state_dict(load_file(str(Path(directory) / "open_clip_model.safetensors")))
        simple = open_clip.get_tokenizer("RN50")
        # open_clip pads to 77 with 0; the causal mask makes the padding irrelevant.
        encode = lambda: {"input_ids": simple([QUERY]).numpy()}
        size = 224
    else:
        model = (SiglipModel if siglip else CLIPModel).from_pretrained(directory, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        encode = (lambda: tokenizer([QUERY], padding="max_length", max_length=64, truncation=True,
                                    return_tensors="np")) if siglip else (lambda: tokenizer([QUERY], return_tensors="np"))
        size = model.config.vision_config.image_size
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        image_path, text_path = Path(tmp) / "image.onnx", Path(tmp) / "text.onnx"
        # nn.MultiheadAttention (open_clip's ViT) takes a fused fast path that ONNX cannot export
        # when autograd is off; with it on (nothing is differentiated) it traces as plain ops.
        with torch.no_grad() if not xlmr else contextlib.nullcontext():
            export_image(model, size, image_path)
            ids = torch.tensor(encode()["input_ids"], dtype=torch.int64)
            torch.onnx.export(Text(model), (ids,), text_path, input_names=["ids"], output_names=["features"],
                              dynamic_axes={"ids": {0: "batch", 1: "seq"}}, dynamo=False, opset_version=17)
        sessions = {"fp32": (image_path, text_path)}
        if args.int8:
            sessions["int8"] = tuple(quantize(path) for path in (image_path, text_path))
        sessions = {
            kind: tuple(ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths)
            for kind, paths in sessions.items()
        }
    rng = np.random.default_rng(1)
    p1 = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    p16 = rng.standard_normal((16, 3, size, size), dtype=np.float32)
    results = []
    for kind, (image, text) in sessions.items():
        b1 = statistics.median(timed(3, 30, lambda: image.run(None, {"pixels": p1})))
        b16 = statistics.median(timed(1, 6, lambda: image.run(None, {"pixels": p16})))

        def query():
            ids = encode()["input_ids"].astype(np.int64)
            f = text.run(None, {"ids": ids})[0]
            return f / np.linalg.norm(f, axis=-1, keepdims=True)

        times = sorted(timed(5, 100, query))
        # 32 queries of 1 to 12 words together, padded to the longest as a
        # batch for this graph is (benches/model.rs has the same queries).
        mixed = None
        if not (siglip or rn50 or xlmr):
            batch = tokenizer(MIXED, padding=True, return_tensors="np")["input_ids"].astype(np.int64)
            mixed = statistics.median(timed(2, 20, lambda: text.run(None, {"ids": batch})))
        result = {
            "impl": "onnxruntime %s %s" % (ort.__version__, kind),
            "model": "SigLIP B/16-224" if siglip else "open_clip RN50" if rn50 else
                     "open_clip xlm-roberta-base-ViT-B-32" if xlmr else "ViT-B/32",
            "threads": args.threads,
            "image_per_s_batch1": 1.0 / b1,
            "image_per_s_batch16": 16.0 / b16,
            "text_ms_p50": times[len(times) // 2] * 1e3,
            "text_ms_p90": times[len(times) * 9 // 10] * 1e3,
        }
        if mixed is not None:
            result["texts32_ms_p50"] = mixed * 1e3
        if kind != "fp32":
            def unit(f):
                return f / np.linalg.norm(f, axis=-1, keepdims=True)

            ref = unit(sessions["fp32"][0].run(None, {"pixels": p16})[0])
            got = unit(image.run(None, {"pixels": p16})[0])
            result["min_cosine_to_fp32"] = float((ref * got).sum(-1).min())
        results.append(result)
    for result in results:
        if args.json:
            print(json.dumps(result))
            continue
        print(f"{result['impl']}, {result['model']}, {args.threads} threads")
        print(f"  images/s, batch 1:   {result['image_per_s_batch1']:8.2f}")
        print(f"  images/s, batch 16:  {result['image_per_s_batch16']:8.2f}")
        print(f"  text query: p50 {result['text_ms_p50']:.2f} ms, p90 {result['text_ms_p90']:.2f} ms")
        if "texts32_ms_p50" in result:
            print(f"  32 queries of 1 to 12 words together: p50 {result['texts32_ms_p50']:.2f} ms")
        if "min_cosine_to_fp32" in result:
            print(f"  smallest cosine to fp32 (16 images): {result['min_cosine_to_fp32']:.5f}")


if __name__ == "__main__":
    main()
