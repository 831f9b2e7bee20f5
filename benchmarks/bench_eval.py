"""Wall time of zero-shot CIFAR-10 + flickr8k retrieval: clipforge vs CLIP_benchmark, same layout/shards.

    python benchmarks/bench_eval.py --model scratch:vit-b-32 --limit 200 --cb-python /tmp/cb/bin/python

Ours: ``clipforge.evaluate`` (DataLoader decode workers, inference_mode, channels_last, length-sorted
text batches). Theirs: ``clip_benchmark.metrics.zeroshot_classification.evaluate`` and
``...zeroshot_retrieval.evaluate`` on open_clip's ``ViT-B-32`` (random init: there is no network for
pretrained weights; the timing depends on the layout, not the weights) fed by a webdataset loader
over the *same* shards with open_clip's own preprocessing. CLIP_benchmark runs in a side venv
(``--cb-python``) because it needs torchvision; see the report for how that venv is made.
``--limit N`` evaluates the first N samples of each dataset (sliced copies under a temp dir), both
sides alike. ``--solvers`` also times the linear probe's torch vs scikit-learn solvers on the CIFAR
features. Timings exclude model construction. The machine may be shared: treat figures as noisy.
``--runtime torch,onnx`` also times ours under onnxruntime (fp32 graphs, the export timed apart as
``export_s``); each side's CPU seconds (process + reaped decode workers, timed parts only) are recorded
because on a shared machine CPU time is the fair measure and wall time mostly the scheduler's share.

Measured 2026-11-30, ViT-B-32 random weights both sides, ``--threads 2 --workers 1``, ONE run each:

    full sets (10,000 CIFAR-10 + 1,000 flickr8k test x 5 captions), 16:12-17:10 UTC, load average 2-4
    while ours ran, 4-7 while CLIP_benchmark ran (other agents' jobs started at 16:45):
    python benchmarks/bench_eval.py --threads 2 --workers 1 --runtime torch,onnx --json
                      zero-shot s  retrieval s  total s  / CLIP_benchmark
    clipforge torch   894.7        96.4         991.5    0.526
    clipforge onnx    482.8        91.8         574.6    0.305 (0.308 with the 7 s export)
    CLIP_benchmark    1026.6       858.5        1885.0

    --limit 1000 (1,000 CIFAR + all 1,000 flickr8k test), 17:15-17:40 UTC, load average 3.5-4.6 for both:
                      wall s  CPU s  wall ratio  CPU ratio
    clipforge torch   472.6   338.8  0.879       0.534
    clipforge onnx    427.2   296.0  0.795       0.466
    CLIP_benchmark    537.6   635.0  (zero-shot 123 CPU s, retrieval 512 CPU s)

    --limit 1000 on the IDLE machine, 18:17-18:32 UTC, load average 1.7-2.2 for both (nothing else running):
                      zero-shot s  retrieval s  wall s  CPU s  wall ratio  CPU ratio
    clipforge torch   53.5         102.9        156.8   307.9  0.333       0.343
    clipforge onnx    54.2         101.7        155.9   303.6  0.331       0.338
    CLIP_benchmark    64.2         407.3        471.4   898.5
    projected to the full 10,000 CIFAR images from this idle run: 0.61 (torch and onnx alike)

The idle run is the one to trust: zero-shot (the image forward pass, the same work in both tools) is 0.83
of CLIP_benchmark's time, retrieval 0.25. On the full sets zero-shot dominates, so the full-size ratio at
idle is ~0.6 (projected), and the loaded full run's 0.53 / 0.30 flattered us (it ran at lower load than
CLIP_benchmark did; onnx and torch are level at idle on this ViT-B-32). The image forward pass is the same work in both tools (zero-shot is ~all of it); retrieval is where
clipforge saves: captions are padded to the batch's longest, not to 77 tokens, and encoded in
length-sorted batches (858 vs 96 s on the full set).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CB_HARNESS = r"""
import json, resource, sys, time
import torch, torch.library
_orig = torch.library.register_fake  # torchvision's CUDA wheel cannot load its C ops on CPU torch;
torch.library.register_fake = lambda *a, **k: (lambda f: f)  # its PIL transforms need none of them
import torchvision  # noqa
torch.library.register_fake = _orig
import open_clip, webdataset as wds
from clip_benchmark.metrics import zeroshot_classification as zc, zeroshot_retrieval as zr

def _accuracy(output, target, topk=(1,)):  # zc.accuracy as released, minus a numpy>=2.x scalar error
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


zc.accuracy = _accuracy


def _cpu():  # this process + its reaped DataLoader workers, as ours is counted
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
model, _, pre = open_clip.create_model_and_transforms(cfg["arch"], pretrained=None)
model.eval()
tok = open_clip.get_tokenizer(cfg["arch"])
out = {}
t0, c0 = time.perf_counter(), _cpu()
ds = wds.WebDataset(cfg["cifar"], shardshuffle=False).decode("pil").to_tuple("png;jpg", "cls").map_tuple(pre, int)
ds.classes = cfg["classnames"]  # CLIP_benchmark reads dataloader.dataset.classes
dl = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], num_workers=cfg["workers"])
m = zc.evaluate(model, dl, tok, cfg["classnames"], cfg["templates"], "cpu", amp=False)
out["zeroshot"] = {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu() - c0, "top1": m["acc1"], "top5": m["acc5"],
                   "mean_per_class_recall": m["mean_per_class_recall"]}
t0, c0 = time.perf_counter(), _cpu()
ds = (wds.WebDataset(cfg["flickr"], shardshuffle=False).decode("pil").to_tuple("jpg", "json")
      .map_tuple(pre, lambda j: j["captions"]))
dl = torch.utils.data.DataLoader(ds, batch_size=cfg["batch_size"], num_workers=cfg["workers"],
                                 collate_fn=lambda b: (torch.stack([x for x, _ in b]), [t for _, t in b]))
m = zr.evaluate(model, dl, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
out["retrieval"] = {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu() - c0, **m}
print(json.dumps(out))
"""


def cpu_seconds(who: int) -> float:
    """User + system CPU of this process (RUSAGE_SELF) or of its reaped children (RUSAGE_CHILDREN: the
    DataLoader workers of a finished loop, the CLIP_benchmark subprocess): on a shared machine CPU time
    is the fair comparison, wall time mostly measures the scheduler's share."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def log(msg: str) -> None:
    print(f"[bench_eval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def slice_samples(shards: list[str], dst: Path, n: int) -> str:
    """First ``n`` samples across ``shards`` into one tar (member bytes unchanged)."""
    from clipforge.data.reader import iter_tar_samples

    count = 0
    with tarfile.open(dst, "w") as tf:
        for url in shards:
            for s in iter_tar_samples(url):
                if count >= n:
                    return str(dst)
                for ext, data in s.items():
                    if not ext.startswith("__"):
                        info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                        info.size = len(data)
                        tf.addfile(info, __import__("io").BytesIO(data))
                count += 1
    return str(dst)


def run_ours(
    args, cifar: list[str], flickr: list[str], classnames: str, precision: str, runtime: str = "torch"
) -> tuple[dict, object]:
    """``runtime`` torch: eager fp32/bf16; onnx: the model exported once (timed apart as ``export_s``,
    into a fresh cache dir, so its cost is never hidden) and run in onnxruntime, fp32 graphs."""
    from clipforge.evaluate.config import EvalConfig
    from clipforge.evaluate.embed import embed_images
    from clipforge.evaluate.recipes import DatasetSpec
    from clipforge.evaluate.runner import evaluate
    from clipforge.export.runtime import load_runtime
    from clipforge.models import load_model

    model = load_model(args.model)
    export_s = 0.0
    if runtime == "onnx":
        t0 = time.perf_counter()
        model = load_runtime(
            model, "onnx", args.threads, cache=Path(tempfile.mkdtemp(prefix="bench_eval_onnx_"))
        )
        export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    c0 = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
    imgs = embed_images(
        model, cifar, labels=True, batch_size=args.batch_size, workers=args.workers, precision=precision,
        desc=f"ours {precision}: cifar",
    )  # fmt: skip
    specs = [
        DatasetSpec("cifar10", cifar, classnames, "cifar10", ("zeroshot",)),
        DatasetSpec("flickr8k", flickr, tasks=("retrieval",)),
    ]
    cfg = EvalConfig(batch_size=args.batch_size, workers=args.workers, cache=False, precision=precision)
    rep = evaluate(model, specs, cfg, images={"cifar10": imgs})
    total = time.perf_counter() - t0
    cpu = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN) - c0
    zs, rt = rep["results"]
    out = {
        "seconds": total,
        "cpu_seconds": cpu,  # main process + its reaped decode workers over the timed part
        "loadavg": os.getloadavg(),
        "runtime": runtime,
        "export_s": export_s,
        "zeroshot": {
            "seconds": imgs.seconds + zs["seconds_task"],
            **{k: zs["metrics"][k] for k in ("top1", "top5")},
        },
        "retrieval": {
            "seconds": rt["seconds_images"] + rt["seconds_task"],
            **{k: v for k, v in rt["metrics"].items() if "R@" in k},
        },  # fmt: skip
        "images": zs["n_images"] + rt["n_images"],
    }
    out["images_per_s"] = out["images"] / total
    return out, imgs


def projected_ratio(ours: dict, cb: dict, limit: int, full: dict[str, int]) -> float:
    """Ours / CLIP_benchmark at the full sizes, from a ``--limit`` run: each side's zero-shot time scales
    with the CIFAR images (the class texts are a fixed few hundred), its retrieval time with the flickr
    images (5 captions each). A projection, labelled as such: the full run is the figure to trust."""

    def at_full(r: dict) -> float:
        zs = r["zeroshot"]["seconds"] * full["cifar"] / min(limit, full["cifar"])
        return zs + r["retrieval"]["seconds"] * full["flickr"] / min(limit, full["flickr"])

    return at_full(ours) / at_full(cb)


def run_cb(args, cifar: list[str], flickr: list[str], classnames: str) -> dict:
    from clipforge.evaluate.zeroshot import load_classnames, load_templates

    cfg = {
        "arch": args.cb_arch,
        "cifar": cifar,
        "flickr": flickr,
        "classnames": load_classnames(classnames),
        "templates": [t.replace("{}", "{c}") for t in load_templates("cifar10")[1]],  # CB formats {c}
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": args.threads,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CB_HARNESS)
    t0, c0 = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    p = subprocess.run([args.cb_python, f.name, json.dumps(cfg)], capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_CHILDREN) - c0
    if p.returncode != 0:
        return {"error": p.stderr[-2000:]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["seconds"] = res["zeroshot"]["seconds"] + res["retrieval"]["seconds"]
    res["cpu_seconds"] = res["zeroshot"]["cpu_seconds"] + res["retrieval"]["cpu_seconds"]
    res["process_wall_s"] = wall
    res["process_cpu_seconds"] = cpu  # whole process incl. imports and model build: an upper bound
    res["loadavg"] = os.getloadavg()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="scratch:vit-b-32", help="our model spec (ViT-B/32 layout by default)")
    ap.add_argument("--cb-arch", default="ViT-B-32", help="open_clip architecture for CLIP_benchmark")
    ap.add_argument(
        "--cb-python", default="/tmp/cb/bin/python", help="python of the CLIP_benchmark side venv"
    )
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each dataset")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="fp32", help="ours: comma list of fp32 / bf16 (each timed)")
    ap.add_argument(
        "--runtime",
        default="torch",
        help="ours: comma list of torch / onnx (each timed; onnx runs fp32 only)",
    )
    ap.add_argument(
        "--solvers", action="store_true", help="also time the probe solvers on the CIFAR features"
    )
    ap.add_argument("--output", default=None, help="write the JSON result here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from clipforge.data.shards import expand_shards
    from clipforge.evaluate.recipes import builtin
    from clipforge.train.data import count_samples
    from clipforge.utils import emit_json, format_table, setup_torch_threads, write_json

    args.threads = setup_torch_threads(args.threads)
    c, fl = builtin("cifar10", args.data_root), builtin("flickr8k", args.data_root)
    cifar, flickr = expand_shards(c.shards), expand_shards(fl.shards)
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    full = {"cifar": count_samples(cifar), "flickr": count_samples(flickr)}
    if args.limit:
        cifar = [slice_samples(cifar, tmp / "cifar.tar", args.limit)]
        flickr = [slice_samples(flickr, tmp / "flickr.tar", args.limit)]
    result = {"model": args.model, "cb_arch": args.cb_arch, "limit": args.limit, "threads": args.threads,
              "batch_size": args.batch_size, "workers": args.workers}  # fmt: skip
    rows, variants, imgs = [], [], None
    for rt in args.runtime.split(","):
        variants += [(rt, p) for p in args.precision.split(",") if rt == "torch" or p == "fp32"]
    for rt, prec in variants:
        name = prec if rt == "torch" else f"{rt}_{prec}"  # torch keeps the old key names
        ours, got = run_ours(args, cifar, flickr, c.classnames, prec, rt)
        imgs = got if imgs is None else imgs  # features for the solver comparison
        result[f"ours_{name}"] = ours
        log(f"ours {name}: {json.dumps(ours)}")  # each side as it finishes: a cut-short run still reports
        rows.append([f"clipforge {name}", "zeroshot+retrieval", ours["seconds"], ours["images_per_s"]])
    if args.cb_python and Path(args.cb_python).exists():
        cb = run_cb(args, cifar, flickr, c.classnames)
        result["clip_benchmark"] = cb
        log(f"clip_benchmark: {json.dumps(cb)[:2000]}")
        if "error" not in cb:
            rows.append(
                ["clip_benchmark", "zeroshot+retrieval", cb["seconds"], ours["images"] / cb["seconds"]]
            )
            for rt, prec in variants:  # ours in each runtime/precision vs CLIP_benchmark's torch fp32
                name = prec if rt == "torch" else f"{rt}_{prec}"
                ours = result[f"ours_{name}"]
                result[f"ratio_ours_{name}_over_cb"] = ours["seconds"] / cb["seconds"]
                result[f"cpu_ratio_ours_{name}_over_cb"] = ours["cpu_seconds"] / cb["cpu_seconds"]
                if rt != "torch":  # the one-time export counted in: the ratio a first-time user sees
                    result[f"ratio_ours_{name}_with_export_over_cb"] = (
                        ours["seconds"] + ours["export_s"]
                    ) / cb["seconds"]
                if args.limit:
                    result[f"projected_full_ratio_ours_{name}_over_cb"] = projected_ratio(
                        ours, cb, args.limit, full
                    )
        else:
            print(f"CLIP_benchmark failed:\n{cb['error']}", file=sys.stderr)
    else:
        result["clip_benchmark"] = {"error": f"no side venv python at {args.cb_python}"}
    if args.solvers:
        from clipforge.evaluate.probe import compare_solvers
        from clipforge.evaluate.recipes import probe_split

        tr, va, te = probe_split(imgs.labels.numpy(), imgs.keys)
        x, y = imgs.emb, imgs.labels
        result["probe_solvers"] = compare_solvers((x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), 10)
        for s, r in result["probe_solvers"].items():
            rows.append([f"probe:{s}", f"top1={r['top1']:.4f} C={r['best_C']:.3g}", r["fit_seconds"], 0.0])
    if args.output:
        write_json(args.output, result)
    if args.json:
        emit_json(result)
    else:
        print(format_table(rows, ["side", "task", "seconds", "images/s"]))
        for k, v in result.items():
            if "ratio_" in k:
                print(f"{k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
