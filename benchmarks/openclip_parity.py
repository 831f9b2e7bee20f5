"""open_clip parity fixtures: tiny random open_clip ViT models + their reference outputs, and the check.

Step 1 runs in a side venv that has open_clip (it cannot be imported next to the CPU torch here: its
torchvision import fails, so a stub that raises on use stands in, as in bench_train.py):

    python -m venv /tmp/oc && /tmp/oc/bin/pip install torch==2.13.0 open_clip_torch safetensors
    /tmp/oc/bin/python benchmarks/openclip_parity.py write --out tests/export/data/openclip_parity

It writes one hub-layout dir per config family (gelu, quickgelu, eos pooling, SigLIP-style logit_bias),
each with ``reference.safetensors`` (pixels, input_ids, open_clip's image/text features, logit scale/bias).
Step 2 runs here (clipforge's venv): ``openclip:DIR`` must give the same features to 1e-5:

    python benchmarks/openclip_parity.py check --out tests/export/data/openclip_parity

Step 3: an export by ``clipforge export --format openclip`` loads in open_clip itself (side venv) and
open_clip's outputs on it equal clipforge's (here):

    clipforge export scratch:vit-nano --format openclip --output /tmp/oc-export
    /tmp/oc/bin/python benchmarks/openclip_parity.py load-export --out /tmp/oc-export --save /tmp/oc-out.safetensors
    python benchmarks/openclip_parity.py check-export --out /tmp/oc-export --save /tmp/oc-out.safetensors

Without a side venv, ``pip install --no-deps --target /tmp/ocpkg open_clip_torch ftfy regex wcwidth``
and ``PYTHONPATH=/tmp/ocpkg python benchmarks/openclip_parity.py write|load-export ...`` works too
(open_clip 3.3.0 with the torchvision stub, measured so: max |diff| 4.8e-07 over the four families).

The fixtures are ~100 KB each (widths 16, 2 layers): commit them if the total stays < 1 MB.

Throughput (issue 15): ViT-B-32 image embedding, the same random weights in open_clip (side venv) and in
clipforge (``openclip:ViT-B-32=FILE``), torch eager vs clipforge's onnx runtime vs open_clip, same
pixels, same batch, ``--threads`` each, in alternating rounds (one driver here; open_clip answers from a
worker process in the side venv, idle while the others run):

    python benchmarks/openclip_parity.py bench --out /tmp/vitb32 --side-python /tmp/oc/bin/python \\
        --threads 2 --batch-size 32 --rounds 5

The text tower is not timed: clipforge's copy gets a stand-in tokenizer (no CLIP BPE files are local).
Measured 2026-11-30 (2 threads, batch 32, 3 rounds, machine shared with ~8 other jobs, load 25-75 on
2 cores, so absolute rates are far below an idle machine's): images/s torch eager 0.72, onnx runtime
1.08, open_clip 0.75: onnx/torch 1.51x, torch/open_clip 0.96x, onnx/open_clip 1.45x; unit embeddings
equal open_clip's to 7.5e-8 (torch) and 1.3e-7 (onnx). The one-time export took 278 s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torchvision_stub  # benchmarks/ is on sys.path when a script runs

BASE = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 300, "width": 16, "heads": 2, "layers": 2},
}
FAMILIES = {
    "vit-gelu": {},
    "vit-quickgelu": {"quick_gelu": True},
    "vit-eos-pool": {"text_cfg": {**BASE["text_cfg"], "pool_type": "eos", "eos_id": 7}},
    "vit-logit-bias": {"init_logit_bias": -10.0},
}


def inputs(cfg: dict):
    """Fixed pixels and token ids: EOT (argmax: the highest id; eos: eos_id) at varying positions."""
    import torch

    g = torch.Generator().manual_seed(0)
    size, t = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]
    pixels = torch.randn(3, 3, size, size, generator=g)
    eot = t.get("eos_id", t["vocab_size"] - 1) if t.get("pool_type") == "eos" else t["vocab_size"] - 1
    ids = torch.zeros(3, t["context_length"], dtype=torch.long)
    for i, n in enumerate((3, 10, t["context_length"])):
        ids[i, : n - 1] = torch.randint(10, t["vocab_size"] - 1, (n - 1,), generator=g)
        ids[i, n - 1] = eot
    return pixels, ids


def write(out: Path) -> None:
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:
        torchvision_stub.install()
    import open_clip
    import torch
    from safetensors.torch import save_file

    for name, over in FAMILIES.items():
        cfg = {**BASE, **over}
        torch.manual_seed(0)
        model = open_clip.CLIP(**cfg).eval()
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        pre = {
            "size": 32,
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }
        (d / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}, indent=2)
        )
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors")
        )
        pixels, ids = inputs(cfg)
        with torch.no_grad():
            ref = {
                "pixels": pixels,
                "input_ids": ids,
                "image": model.encode_image(pixels),
                "text": model.encode_text(ids),
                "logit_scale": model.logit_scale.detach().reshape(1),
            }
            if getattr(model, "logit_bias", None) is not None:
                ref["logit_bias"] = model.logit_bias.detach().reshape(1)
        save_file(ref, str(d / "reference.safetensors"))
        print(f"wrote {d}")


def check(out: Path) -> int:
    import torch
    from safetensors.torch import load_file

    from clipforge.models.openclip import build, build_config
    from clipforge.models.tokenizer import Tokenizer

    worst = 0.0
    for d in sorted(p for p in out.iterdir() if (p / "reference.safetensors").is_file()):
        ref = load_file(str(d / "reference.safetensors"))
        config = build_config(f"openclip:{d}")
        # the fixtures carry token ids, not text: any tokenizer object will do (it is never called)
        model = build(config, tokenizer=Tokenizer.minilm(context_length=config.context_length)).eval()
        ids = ref["input_ids"]
        with torch.no_grad():
            a = model.encode_image(ref["pixels"], normalize=False)
            b = model.encode_text({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, normalize=False)
        diffs = {
            "image": float((a - ref["image"]).abs().max()),
            "text": float((b - ref["text"]).abs().max()),
            "logit_scale": float((model.logit_scale.detach() - ref["logit_scale"][0]).abs()),
        }
        if "logit_bias" in ref:
            diffs["logit_bias"] = float((model.logit_bias.detach() - ref["logit_bias"][0]).abs())
        worst = max(worst, *diffs.values())
        print(d.name, json.dumps(diffs))
    print(f"max |diff| {worst:.2e} ({'ok' if worst < 1e-5 else 'FAIL'} at 1e-5)")
    return 0 if worst < 1e-5 else 1


def load_export(directory: Path, save: Path | None) -> int:
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:
        torchvision_stub.install()
    import open_clip
    import torch

    model = open_clip.create_model(f"local-dir:{directory}").eval()
    cfg = json.loads((directory / "open_clip_config.json").read_text())["model_cfg"]
    pixels, ids = inputs(cfg)
    with torch.no_grad():
        ref = {
            "pixels": pixels,
            "input_ids": ids,
            "image": model.encode_image(pixels),
            "text": model.encode_text(ids),
            "logit_scale": model.logit_scale.detach().reshape(1),
        }
    print(json.dumps({k: list(v.shape) for k, v in ref.items()}))
    if save is not None:
        from safetensors.torch import save_file

        save_file(ref, str(save))
    return 0


def check_export(directory: Path, save: Path) -> int:
    """clipforge's own model (openclip:DIR of its export) vs what open_clip computed on the export."""
    import torch
    from safetensors.torch import load_file

    import clipforge.models.openclip  # noqa: F401  (registers openclip: until registry.py lists it)
    from clipforge.models import load_model

    ref = load_file(str(save))
    model = load_model(f"openclip:{directory}")
    ids = ref["input_ids"]
    with torch.no_grad():
        a = model.encode_image(ref["pixels"], normalize=False)
        b = model.encode_text({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, normalize=False)
    worst = max(float((a - ref["image"]).abs().max()), float((b - ref["text"]).abs().max()))
    print(
        f"export loaded by open_clip vs clipforge: max |diff| {worst:.2e} ({'ok' if worst < 1e-5 else 'FAIL'})"
    )
    return 0 if worst < 1e-5 else 1


def bench_worker(out: Path, threads: int, batch: int) -> int:
    """Side venv: a random open_clip ViT-B-32 (weights + pixels written to ``out``), then one timed
    ``encode_image`` per ``run`` line on stdin (seconds on stdout); ``quit`` saves its embeddings."""
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:
        torchvision_stub.install()
    import time

    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "vit-b-32.safetensors"))
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    save_file({"pixels": pixels}, str(out / "pixels.safetensors"))
    print(
        json.dumps({"ready": True, "open_clip": open_clip.__version__, "torch": torch.__version__}),
        flush=True,
    )
    with torch.inference_mode():
        model.encode_image(pixels)  # warm-up
        for line in sys.stdin:
            if line.strip() == "run":
                t = time.perf_counter()
                model.encode_image(pixels)
                print(time.perf_counter() - t, flush=True)
            elif line.strip() == "quit":
                save_file({"image": model.encode_image(pixels)}, str(out / "open_clip_image.safetensors"))
                print("bye", flush=True)
                return 0
    return 0


def bench(out: Path, side_python: str, threads: int, batch: int, rounds: int) -> int:
    """Driver (clipforge's venv): images/s of torch eager, onnx runtime and open_clip, alternating."""
    import statistics
    import subprocess
    import time

    import torch
    from safetensors.torch import load_file

    from clipforge.export.runtime import load_runtime
    from clipforge.models.openclip import build, build_config
    from clipforge.models.tokenizer import Tokenizer
    from clipforge.utils import setup_torch_threads

    setup_torch_threads(threads)
    cmd = [side_python, __file__, "bench-worker", "--out", str(out), "--threads", str(threads),
           "--batch-size", str(batch)]  # fmt: skip
    worker = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(worker.stdout.readline())
        config = build_config(f"openclip:ViT-B-32={out / 'vit-b-32.safetensors'}")
        model = build(config, tokenizer=Tokenizer.minilm(context_length=config.context_length)).eval()
        pixels = load_file(str(out / "pixels.safetensors"))["pixels"]
        t0 = time.perf_counter()
        onnx = load_runtime(model, "onnx", threads, cache=out / "onnx")
        export_s = time.perf_counter() - t0

        def run_open_clip() -> float:
            worker.stdin.write("run\n")
            worker.stdin.flush()
            return float(worker.stdout.readline())

        def timed(fn) -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                fn(pixels)
            return time.perf_counter() - t

        runs = {"torch": lambda: timed(model.encode_image), "onnx": lambda: timed(onnx.encode_image),
                "open_clip": run_open_clip}  # fmt: skip
        for fn in runs.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for k, fn in runs.items():
                times[k].append(fn())
        worker.stdin.write("quit\n")
        worker.stdin.flush()
        worker.stdout.readline()
        ref = torch.nn.functional.normalize(
            load_file(str(out / "open_clip_image.safetensors"))["image"], dim=-1
        )
        with torch.inference_mode():
            diffs = {"torch": float((model.encode_image(pixels) - ref).abs().max()),
                     "onnx": float((onnx.encode_image(pixels) - ref).abs().max())}  # fmt: skip
    finally:
        if worker.poll() is None:
            worker.kill()
    ips = {k: batch / statistics.median(v) for k, v in times.items()}
    res = {
        "model": "ViT-B-32 (random, same weights)", "threads": threads, "batch_size": batch, "rounds": rounds,
        "images_per_s": ips, "onnx_vs_torch": ips["onnx"] / ips["torch"],
        "torch_vs_open_clip": ips["torch"] / ips["open_clip"], "onnx_vs_open_clip": ips["onnx"] / ips["open_clip"],
        "max_abs_diff_vs_open_clip": diffs, "export_s": export_s, "side": info,
    }  # fmt: skip
    print(json.dumps(res, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["write", "check", "load-export", "check-export", "bench", "bench-worker"])
    p.add_argument("--out", required=True, type=Path, help="fixtures dir (write/check) or an export dir")
    p.add_argument(
        "--save", type=Path, default=None, help="load-export/check-export: open_clip's outputs file"
    )
    p.add_argument("--side-python", default="/tmp/oc/bin/python", help="bench: the side venv's python")
    p.add_argument("--threads", type=int, default=2, help="bench: intra-op threads of every runtime")
    p.add_argument("--batch-size", type=int, default=32, help="bench: images per timed batch")
    p.add_argument("--rounds", type=int, default=5, help="bench: alternating rounds (median reported)")
    a = p.parse_args()
    if a.step == "bench":
        return bench(a.out, a.side_python, a.threads, a.batch_size, a.rounds)
    if a.step == "bench-worker":
        return bench_worker(a.out, a.threads, a.batch_size)
    if a.step == "write":
        write(a.out)
        return 0
    if a.step == "check":
        return check(a.out)
    if a.step == "load-export":
        return load_export(a.out, a.save)
    return check_export(a.out, a.save)


if __name__ == "__main__":
    sys.exit(main())
