"""Training benchmarks.

(a) ``cache``: one epoch of head training from cached locked-tower features vs one epoch that
    recomputes the frozen towers every step (cache off) — same model, data, batch. Target >= 20x.
(b) ``throughput``: training samples/s of a ViT-B/32-layout scratch model through clipforge's step,
    and open_clip's training step on the same architecture/batch/dtype, run by ``--open-clip-python``
    (a side venv: ``python -m venv /tmp/oc && /tmp/oc/bin/pip install torch==2.13.0 open_clip_torch``;
    where torchvision's wheel does not load against the CPU torch build, a stub that raises on use
    stands in for it: the ViT step never touches it). Also reports FLOPs per step (FlopCounterMode),
    achieved GFLOP/s and the ratio to this machine's dense-matmul GFLOP/s.

    python benchmarks/bench_train.py cache --model towers:efficientnet-lite0+minilm-l6 \\
        --data ../shared/data/flickr8k/train-000000.tar --limit 512 --batch-size 128 --json
    python benchmarks/bench_train.py throughput --model scratch:vit-b-32 --batch-size 32 --steps 3 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clipforge.utils import default_output, emit_json, format_table, setup_torch_threads, write_json

log = logging.getLogger("bench_train")


def _slice(src: list[str], limit: int, tmp: Path) -> list[str]:
    """First ``limit`` samples of the shards as one temp shard (keeps the benchmark bounded)."""
    import io
    import tarfile

    from clipforge.data.reader import iter_tar_samples
    from clipforge.data.shards import expand_shards

    out = tmp / "slice-000000.tar"
    n = 0
    with tarfile.open(out, "w") as tf:
        for url in expand_shards(src):
            for s in iter_tar_samples(url):
                for ext, data in s.items():
                    if ext.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                n += 1
                if n >= limit:
                    return [str(out)]
    return [str(out)]


def bench_cache(args: argparse.Namespace) -> dict:
    from clipforge.config import parse_kv
    from clipforge.train import train

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shards = _slice(args.data, args.limit, tmp)
        base = dict(
            model=args.model,
            model_opts=parse_kv(args.model_opt, "--model-opt"),  # typed as `clipforge train` does
            data=shards,
            epochs=1,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=False,
            tensorboard=False,
            cache_dir=str(tmp / "cache"),
        )
        t = time.perf_counter()
        first = train({**base, "output": str(tmp / "cached1")})  # builds the cache
        build_s = time.perf_counter() - t
        cached = train({**base, "output": str(tmp / "cached2")})  # reuses it
        t = time.perf_counter()
        recompute = train({**base, "output": str(tmp / "recompute"), "cache": "off", "shuffle_buffer": 0})
        recompute_s = time.perf_counter() - t
    return {
        "model": args.model,
        "samples": first["samples"],
        "batch_size": args.batch_size,
        "cache_build_plus_epoch_s": build_s,
        "cached_epoch_s": cached["train_seconds"],
        "recompute_epoch_s": recompute["train_seconds"],
        "recompute_wall_s": recompute_s,
        "speedup": recompute["train_seconds"] / max(cached["train_seconds"], 1e-9),
        "mode_check": [cached["mode"], recompute["mode"]],
    }


def matmul_flops(n: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """The machine's own dense-matmul FLOP/s at the current thread count: the roofline for MFU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def step_flops(model: torch.nn.Module, batch: dict, precision: str) -> float:
    """FLOPs of one forward+backward (torch's FlopCounterMode: matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipforge.train.loss import ClipLoss
    from clipforge.train.step import forward_backward

    with FlopCounterMode(display=False) as fc:
        forward_backward(model, ClipLoss(), batch, 1, torch.device("cpu"), precision)
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def bench_clipforge_step(args: argparse.Namespace) -> dict:
    from clipforge.models import load_model
    from clipforge.train.loss import ClipLoss
    from clipforge.train.optim import build_optimizer
    from clipforge.train.step import forward_backward

    model = load_model(args.model)
    model.train()
    opt = build_optimizer(model, 1e-4, 0.1)
    b = args.batch_size
    size = model.config.preprocess.get("size", 224)
    if args.pad_to_context:  # open_clip always runs the full context; clipforge pads to the batch's longest
        model.tokenizer.pad_to_max = True
    toks = model.tokenize(["a photo of a dog playing with a red ball on the grass"] * b)
    batch = {"image": {"pixels": torch.randn(b, 3, size, size)}, "text": dict(toks)}
    flops = step_flops(model, batch, args.precision)
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        forward_backward(model, ClipLoss(), batch, 1, torch.device("cpu"), args.precision)
        opt.step()
        if i:  # first step is warmup
            times.append(time.perf_counter() - t)
    return {
        "impl": "clipforge",
        "samples_per_s": b / (sum(times) / len(times)),
        "step_s": sum(times) / len(times),
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_step": flops,
        "text_tokens": int(toks["input_ids"].shape[1]),
    }


OPEN_CLIP_STEP = r"""
import json, sys, time


try:
    import torchvision.transforms  # noqa: F401
except Exception:  # the wheel does not load against this CPU torch: see benchmarks/torchvision_stub.py
    import torchvision_stub

    torchvision_stub.install()
import torch, open_clip
torch.set_num_threads(int(sys.argv[4]))
b, steps, prec = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model = open_clip.create_model("ViT-B-32")
model.train()
n_params = sum(p.numel() for p in model.parameters())
loss_fn = open_clip.ClipLoss()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
img = torch.randn(b, 3, 224, 224)
txt = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog playing with a red ball on the grass"] * b)
times = []
for i in range(steps + 1):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
        f_i, f_t, s = model(img, txt)[:3]
        loss = loss_fn(f_i, f_t, s)
    loss.backward()
    opt.step()
    if i:
        times.append(time.perf_counter() - t)
step = sum(times) / len(times)
print(json.dumps({"impl": "open_clip", "samples_per_s": b / step, "step_s": step, "params": n_params}))
"""


def bench_throughput(args: argparse.Namespace) -> dict:
    ours = bench_clipforge_step(args)
    out = {"model": args.model, "batch_size": args.batch_size, "precision": args.precision, "clipforge": ours}
    peak = matmul_flops(dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    out["matmul_gflops"] = peak / 1e9
    out["achieved_gflops"] = ours["flops_per_step"] / ours["step_s"] / 1e9
    out["mfu_vs_matmul"] = out["achieved_gflops"] * 1e9 / peak
    cmd = [
        args.open_clip_python,
        "-c",
        OPEN_CLIP_STEP,
        str(args.batch_size),
        str(args.steps),
        args.precision,
        str(torch.get_num_threads()),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode == 0:
        out["open_clip"] = json.loads(r.stdout.strip().splitlines()[-1])
        out["ratio"] = ours["samples_per_s"] / out["open_clip"]["samples_per_s"]
        if args.pad_to_context:  # same tokens -> same FLOPs per step
            out["open_clip"]["achieved_gflops"] = ours["flops_per_step"] / out["open_clip"]["step_s"] / 1e9
    else:
        out["open_clip"] = {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["cache", "throughput"])
    p.add_argument("--model", default="towers:efficientnet-lite0+minilm-l6")
    p.add_argument("--model-opt", action="append", default=[])
    p.add_argument("--data", nargs="+", default=["../shared/data/flickr8k/train-000000.tar"])
    p.add_argument("--limit", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--open-clip-python", default=sys.executable)
    p.add_argument(
        "--pad-to-context",
        action="store_true",
        help="pad text to the full context (77) as open_clip does: equal FLOPs, a pure step-speed ratio",
    )
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--out",
        default=str(default_output("bench") / "bench_train.json"),
        help="result JSON (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    setup_torch_threads(args.threads)
    res = bench_cache(args) if args.what == "cache" else bench_throughput(args)
    res["threads"] = torch.get_num_threads()
    write_json(args.out, res)
    if args.json:
        emit_json(res)
    else:
        flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in res.items()}
        print(format_table(flat.items(), ["metric", "value"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
