"""Image embedding throughput, towers model: onnxruntime (the ``--format onnx`` export) vs torch eager.

Both run in this one process on the same pixels, ``--threads`` intra-op threads each (issue 15's
target: onnxruntime >= 1.5x torch at 2 threads), in alternating rounds so that load from other
processes on a shared machine hits both alike; the median round per runtime is reported. torch runs
clipforge's own path (``model.encode_image``: BN folded into the convs, channels_last, fp32).

    python benchmarks/bench_onnx.py --threads 2 --batch-size 32 --rounds 5 --json

``--int8``: also the int8 (dynamic) graphs, image and text throughput, and on ``--retrieval N`` real
flickr8k test pairs the image<->text R@1 of torch fp32 / onnx fp32 / onnx int8 side by side plus the
lowest cosine between fp32 and int8 embeddings (pass a trained model dir as --model: an untrained
head gives R@1 near chance, where only the agreement is informative).

Measured 2026-11-30 (2 threads, batch 32, 224 px, load average 6-8 from other agents on the shared
CPUs; ``--int8 --retrieval 100``): images/s torch 14.5, onnxruntime 33.8 (2.34x; an earlier run
without --int8: 19.2 vs 39.2, 2.04x); int8 image graph 4.9 images/s (dynamic ConvInteger is slower,
min cosine to fp32 0.81: not offered), int8 text graph 233 vs 129 texts/s fp32 (1.8x, min cosine 0.92).
Those runs had onnxruntime's intra-op spinning on; the sessions now sleep when idle (export/onnx.py
``sessions(spin=False)``), which made the served onnx model ~2x torch on a loaded CPU (bench_serve.py).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipforge.utils import emit_json, format_table, setup_torch_threads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="towers:efficientnet-lite0+minilm-l6")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (each: one batch per runtime)")
    p.add_argument("--int8", action="store_true", help="also time/compare the int8 dynamic graphs")
    p.add_argument("--retrieval", type=int, default=0, help="N flickr8k test images for R@1 (0: off)")
    p.add_argument(
        "--flickr", default=str(Path(__file__).resolve().parents[2] / "shared/data/flickr8k/test-000000.tar")
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from clipforge.export import export_model
    from clipforge.export.onnx import sessions
    from clipforge.models import load_model

    setup_torch_threads(a.threads)
    model = load_model(a.model).eval()
    size = int(model.config.preprocess["size"])
    pixels = torch.randn(a.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = export_model(model, "onnx", f"{tmp}/onnx", quantize_int8="all" if a.int8 else "none")
        export_s = time.perf_counter() - t0
        image_sess, text_sess = sessions(f"{tmp}/onnx", threads=a.threads)
        feed = {"pixels": pixels.numpy()}
        extra = {}
        if a.int8:
            extra = int8_rows(model, f"{tmp}/onnx", pixels, a)

        def run_torch():
            with torch.inference_mode():
                return model.encode_image(pixels)

        def run_ort():
            return image_sess.run(None, feed)[0]

        run_torch(), run_ort()  # warm-up (allocations, lazily fused prefix)
        times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        for _ in range(a.rounds):
            for name, fn in (("torch", run_torch), ("onnxruntime", run_ort)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        diff = float((run_torch() - torch.from_numpy(run_ort())).abs().max())
    ips = {k: a.batch_size / statistics.median(v) for k, v in times.items()}
    result = {
        "model": a.model,
        "threads": a.threads,
        "batch_size": a.batch_size,
        "image_size": size,
        "rounds": a.rounds,
        "images_per_s": ips,
        "speedup_onnxruntime_vs_torch": ips["onnxruntime"] / ips["torch"],
        "max_abs_diff": diff,
        "export_s": export_s,
        **extra,
        "opset": summary["opset"],
        "torch": torch.__version__,
    }
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if a.json:
        emit_json(result)
    else:
        rows = [(k, f"{v:.1f}") for k, v in ips.items()]
        print(format_table(rows, ["runtime", "images/s"]))
        print(f"onnxruntime / torch: {result['speedup_onnxruntime_vs_torch']:.2f}x (max |diff| {diff:.1e})")
    return 0


def int8_rows(model, directory: str, pixels: torch.Tensor, a: argparse.Namespace) -> dict:
    """Throughput of the int8 graphs (images, texts) vs fp32 ones, and retrieval R@1 when asked."""
    from clipforge.export.onnx import sessions
    from clipforge.export.runtime import OnnxClipModel

    texts = [
        f"a photo of {w} playing near the water on a sunny day" for w in ("a dog", "two children", "a man")
    ] * 22
    tokens = {k: v.numpy() for k, v in model.tokenize(texts[: a.batch_size * 2]).items()}
    out: dict = {"int8_images_per_s": {}, "int8_texts_per_s": {}}
    for kind, int8 in (("fp32", False), ("int8", True)):
        img, txt = sessions(directory, threads=a.threads, int8=int8)
        img.run(None, {"pixels": pixels.numpy()}), txt.run(None, tokens)
        ti, tt = [], []
        for _ in range(a.rounds):
            t = time.perf_counter()
            img.run(None, {"pixels": pixels.numpy()})
            ti.append(time.perf_counter() - t)
            t = time.perf_counter()
            txt.run(None, tokens)
            tt.append(time.perf_counter() - t)
        out["int8_images_per_s"][kind] = len(pixels) / statistics.median(ti)
        out["int8_texts_per_s"][kind] = len(tokens["input_ids"]) / statistics.median(tt)
    if a.retrieval:
        out["retrieval"] = retrieval(
            model, OnnxClipModel(directory, a.threads), OnnxClipModel(directory, a.threads, int8=True), a
        )
    return out


def retrieval(model, fp32, int8, a: argparse.Namespace) -> dict:
    """flickr8k test: image->text and text->image R@1 over the first N images (all 5 captions each)."""
    import io
    import json

    from PIL import Image

    from clipforge.data.reader import iter_tar_samples
    from clipforge.models.encode import embed_pil_images, embed_texts

    images, caps, owner = [], [], []
    for s in iter_tar_samples(a.flickr):
        if "jpg" not in s or "json" not in s:
            continue
        images.append(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        for c in json.loads(s["json"])["captions"]:
            caps.append(c)
            owner.append(len(images) - 1)
        if len(images) >= a.retrieval:
            break
    owner_arr = np.array(owner)
    res, embs = {}, {}
    for name, m in (("torch_fp32", model), ("onnx_fp32", fp32), ("onnx_int8", int8)):
        im, tx = embed_pil_images(m, images), embed_texts(m, caps)
        embs[name] = (im, tx)
        sim = im @ tx.T
        i2t = float(np.mean(owner_arr[sim.argmax(1)] == np.arange(len(images))))
        t2i = float(np.mean(sim.argmax(0) == owner_arr))
        res[name] = {"image_to_text_R@1": i2t, "text_to_image_R@1": t2i}
    for side, k in (("image", 0), ("text", 1)):
        res[f"min_cos_fp32_int8_{side}"] = float((embs["onnx_fp32"][k] * embs["onnx_int8"][k]).sum(1).min())
    res["n_images"], res["n_captions"] = len(images), len(caps)
    return res


if __name__ == "__main__":
    sys.exit(main())
