"""Image embedding throughput, towers model: onnxruntime (the ``--format onnx`` export) vs torch eager.

Both run in this one process on the same pixels, ``--threads`` intra-op threads each (issue 15's
target: onnxruntime >= 1.5x torch at 2 threads), in alternating rounds so that load from other
processes on a shared machine hits both alike; the median round per runtime is reported. torch runs
clipforge's own path (``model.encode_image``: BN folded into the convs, channels_last, fp32).

    python benchmarks/bench_onnx.py --threads 2 --batch-size 32 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time

import torch

from clipforge.utils import emit_json, format_table, setup_torch_threads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="towers:efficientnet-lite0+minilm-l6")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (each: one batch per runtime)")
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
        summary = export_model(model, "onnx", f"{tmp}/onnx")
        export_s = time.perf_counter() - t0
        image_sess, _ = sessions(f"{tmp}/onnx", threads=a.threads)
        feed = {"pixels": pixels.numpy()}

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


if __name__ == "__main__":
    sys.exit(main())
