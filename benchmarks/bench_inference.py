"""Bulk image inference to a searchable index: ``clipforge index build`` vs clip-retrieval, same shards.

    python benchmarks/bench_inference.py --vs clip-retrieval --limit 300 --cr-python /tmp/clip-retrieval/bin/python

Both sides embed the same images (the first ``--limit`` flickr8k test samples, sliced into one tar)
with the same model -- clipforge's towers model, plugged into clip-retrieval through all_clip's loader
registry as a ``clipforge:`` prefix (there is no network for open_clip/HF weights; the timing depends
on the pipeline, not the weights) -- with the same batch size, decode workers and torch threads.

- clip-retrieval: ``clip_retrieval.clip_inference.main`` (webdataset input, images only, sequential
  distributor) then ``clip_retrieval.clip_index`` (autofaiss) on its embeddings; its own loader,
  DataLoader collate and ``no_grad`` forward, the model's eval preprocessing as its ``preprocess``.
- clipforge: ``clipforge index build`` (``--thumb-size 0``: clip-retrieval makes no thumbnails).

Reported: images/s of the embedding step -- clip-retrieval: its runner's own per-batch timing (stats/,
model load excluded; its ``main()`` wall with the model load is given too); clipforge: the build's
``embed_seconds``, which includes the model load, so the ratio is conservative for clipforge -- and
the end-to-end seconds from the command start to a searchable index (process start-up, imports, model
load and index included), plus CPU seconds of each process tree.

Measured 2026-11-30 18:18 UTC on the idle machine (load 0.5-1.3), towers model, 2 threads, 1 worker:
``python benchmarks/bench_inference.py --limit 1000 --threads 2 --workers 1 --json``: clipforge 76.6
images/s (model load included), 15.6 s to a searchable index, 25.2 CPU s; clip-retrieval 41.5 images/s
(its loop), 38.5 s, 65.4 CPU s: 1.85x images/s, 2.47x end to end.

The side venv needs no torch of its own (made so here, 2026-11-30):

    python3 -m venv /tmp/clip-retrieval
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/clip-retrieval/lib/python3.11/site-packages/zz_main.pth
    /tmp/clip-retrieval/bin/pip install --no-deps clip-retrieval all_clip clip-anytorch open_clip_torch \\
        ftfy wcwidth autofaiss embedding-reader fire
    /tmp/clip-retrieval/bin/pip install flask flask-restful flask-cors prometheus-client h5py termcolor

torchvision, sentence_transformers and wandb are stubbed (imported, never used here), and autofaiss's
json dump of numpy-2 float32 scores is patched in the harness (autofaiss pins numpy<2).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torchvision_stub  # benchmarks/ is on sys.path when a script runs

DATA = Path(os.environ.get("CLIPFORGE_DATA", "/work/shared/data")) / "flickr8k"

CR_HARNESS = r"""
import json, sys, time, types
t_start = time.perf_counter()
cfg = json.loads(sys.argv[1])
import torch
torch.set_num_threads(cfg["threads"])
import all_clip.main as acm
import numpy as np

_default = json.JSONEncoder.default  # autofaiss (pinned numpy<2) json.dumps numpy float32 scores


def _np_default(self, o):
    return o.item() if isinstance(o, np.generic) else _default(self, o)


json.JSONEncoder.default = _np_default


def load_clipforge(spec, use_jit, device, cache_path):
    from clipforge import load_model
    from clipforge.evaluate.embed import eval_transform
    model = load_model(spec).eval().to(device)
    return model, eval_transform(model), lambda texts: model.tokenize(texts)["input_ids"]


acm._CLIP_REGISTRY = {"clipforge:": load_clipforge, **acm._CLIP_REGISTRY}
from clip_retrieval.clip_inference.main import main as inference
from clip_retrieval.clip_index import clip_index

t0 = time.perf_counter()
inference(input_dataset=cfg["tar"], output_folder=cfg["emb"], input_format="webdataset",
          batch_size=cfg["batch_size"], num_prepro_workers=cfg["workers"], enable_text=False,
          enable_image=True, enable_metadata=False, clip_model="clipforge:" + cfg["model"],
          use_jit=False, enable_wandb=False, wds_number_file_per_input_file=cfg["n"])
t1 = time.perf_counter()
clip_index(embeddings_folder=cfg["emb"], index_folder=cfg["idx"], max_index_memory_usage="4G",
           current_memory_available="8G", nb_cores=cfg["threads"])
t2 = time.perf_counter()
print("\n" + json.dumps({"inference_s": t1 - t0, "index_s": t2 - t1, "startup_s": t0 - t_start}))
"""


# all_clip imports torchvision (OpenAI CLIP transforms), the mapper sentence_transformers (mclip) and
# the logger wandb; none is used here. Stubs on PYTHONPATH reach the processes clip-retrieval spawns.
STUBBED = (*torchvision_stub.TORCHVISION, "sentence_transformers", "wandb")


def write_stubs(root: Path) -> Path:
    return torchvision_stub.write_package(root, STUBBED)


def slice_tar(n: int, dst: Path) -> int:
    """First ``n`` samples of the flickr8k test shard into ``dst`` (members unchanged)."""
    count, key = 0, None
    with tarfile.open(DATA / "test-000000.tar") as src, tarfile.open(dst, "w") as out:
        for m in src:
            k = m.name.rsplit("/", 1)[-1].split(".", 1)[0]
            if k != key:
                if count >= n:
                    break
                key, count = k, count + 1
            f = src.extractfile(m)
            if f is not None:
                info = tarfile.TarInfo(m.name)
                data = f.read()
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return count


def timed(cmd: list[str], log: Path, extra_env: dict | None = None) -> tuple[dict, str]:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env |= extra_env or {}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{Path(cmd[0]).name} failed (rc {p.returncode}); see {log}:\n{p.stderr[-2000:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"end_to_end_s": wall, "cpu_s": cpu}, p.stdout


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vs", choices=["clip-retrieval"], default="clip-retrieval")
    p.add_argument("--model", default="towers:efficientnet-lite0+minilm-l6")
    p.add_argument("--limit", type=int, default=300, help="first N flickr8k test images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="decode workers, both sides")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--cr-python", default="/tmp/clip-retrieval/bin/python", help="clip-retrieval venv python")
    p.add_argument("--work", default="/tmp/bench_inference", help="scratch dir (not the repo)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not Path(args.cr_python).exists():
        raise SystemExit(f"no clip-retrieval venv at {args.cr_python} (see --help)")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tar = work / "images-000000.tar"
    n = slice_tar(args.limit, tar)
    load0 = os.getloadavg()
    cfg = {"tar": str(tar), "emb": str(work / "cr_emb"), "idx": str(work / "cr_index"), "n": n}
    cfg |= {
        "model": args.model,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": args.threads,
    }
    stubs = {"PYTHONPATH": str(write_stubs(work / "stubs"))}
    cr, out = timed([args.cr_python, "-c", CR_HARNESS, json.dumps(cfg)], work / "clip-retrieval.log", stubs)
    cr.update(last_json(out))
    loop = [json.loads(f.read_text()) for f in sorted((work / "cr_emb" / "stats").glob("*.json"))]
    cr["loop_s"] = sum(r.get("total_duration", 0.0) for r in loop)  # its runner's batches: no model load
    cr["forward_s"] = sum(r.get("inference_duration", 0.0) for r in loop)
    cr["images_per_s"] = n / cr["loop_s"] if cr["loop_s"] else None
    cr["images_per_s_main"] = n / cr["inference_s"] if cr.get("inference_s") else None  # model load incl.
    clipforge = str(Path(sys.executable).parent / "clipforge")
    cmd = [
        clipforge,
        "index",
        "build",
        "--data",
        str(tar),
        "--model",
        args.model,
        "--output",
        str(work / "cf_index"),
    ]
    cmd += [
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
    ]
    cmd += ["--thumb-size", "0", "--overwrite", "--json"]
    cf, out = timed(cmd, work / "clipforge.log")
    stats = last_json(out)
    cf["build"] = stats
    embed_s = next((stats[k] for k in ("embed_seconds", "embed_s", "encode_seconds") if k in stats), None)
    cf["embed_s"] = embed_s
    cf["images_per_s"] = n / (embed_s or cf["end_to_end_s"])  # includes the model load: conservative
    res = {
        "images": n,
        "model": args.model,
        "threads": args.threads,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "results": {"clipforge": cf, "clip-retrieval": cr},
        "ratio_images_per_s": cf["images_per_s"] / cr["images_per_s"] if cr.get("images_per_s") else None,
        "ratio_end_to_end": cr["end_to_end_s"] / cf["end_to_end_s"],
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(res, indent=1, default=str))
        return
    print(f"{n} images, {args.model}, {args.threads} threads, {args.workers} workers, load {load0}")
    for name, r in res["results"].items():
        print(
            f"{name:15s} images/s {r['images_per_s'] or 0:7.1f}  end-to-end {r['end_to_end_s']:6.1f} s  "
            f"CPU {r['cpu_s']:6.1f} s"
        )
    if res["ratio_images_per_s"]:
        print(f"ratio images/s clipforge/clip-retrieval: {res['ratio_images_per_s']:.2f}x (target >= 1.5x)")
    print(f"ratio end-to-end: {res['ratio_end_to_end']:.2f}x")


if __name__ == "__main__":
    main()
