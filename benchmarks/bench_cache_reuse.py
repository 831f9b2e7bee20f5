"""Feature-cache reuse for derived shards: a filtered and a recaptioned copy of cached shards, assembled
from cached rows vs the full frozen-tower pass (the peer it replaces), with the quickstart towers.

    python benchmarks/bench_cache_reuse.py --limit 1000 --threads 1 [--json]

1. Source: the first ``--limit`` flickr8k train samples, cached (the full pass; the curate stage's fold
   scorers do this while curating).
2. Derived, as ``curate filter``/``curate fix`` write them: ``filtered`` keeps every other sample with a
   key-hash rule (~50%); ``fixed`` keeps all, a third of them with a new caption.
3. Each derived set is cached twice: with reuse (the default) and with reuse off (full pass), in
   separate cache dirs; CPU and wall seconds of each and their ratio. Features are checked equal.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from clipforge.data.reader import iter_tar_samples
from clipforge.utils import emit_json, format_table

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def write(path: Path, samples: list[dict]) -> str:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if not ext.startswith("__"):
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(path)


def recaption(s: dict, text: str) -> dict:
    meta = {**json.loads(s["json"]), "captions": [text]}
    return {**s, "txt": text.encode(), "json": json.dumps(meta).encode()}


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(FLICKR / "train-000000.tar"))
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from clipforge.models import load_model
    from clipforge.quickstart import RECIPES
    from clipforge.train import cache as cm

    model = load_model("towers:efficientnet-lite0+minilm-l6", **RECIPES["best"]["model_opts"])
    work = Path(tempfile.mkdtemp(prefix="cache_reuse_"))
    try:
        samples = []
        for s in iter_tar_samples(a.data):
            samples.append({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
            if len(samples) == a.limit:
                break
        src = write(work / "source-000000.tar", samples)
        keep = [s for s in samples if hashlib.sha1(s["__key__"].encode()).digest()[0] % 2 == 0]
        derived = {
            "filtered": write(work / "filtered-000000.tar", keep),
            "fixed": write(
                work / "fixed-000000.tar",
                [
                    recaption(s, f"a new caption number {i}") if i % 3 == 0 else s
                    for i, s in enumerate(samples)
                ],
            ),
        }
        kw = dict(batch_size=128, workers=1, progress=False)
        _, src_wall, src_cpu = timed(lambda: cm.load_or_build_cache(model, [src], work / "on", **kw))
        shutil.copytree(work / "on", work / "off")
        rows, res = [], {"source": {"n": len(samples), "wall_s": src_wall, "cpu_s": src_cpu}}
        real = cm.reuse_shard
        for name, url in derived.items():
            on, on_wall, on_cpu = timed(lambda u=url: cm.load_or_build_cache(model, [u], work / "on", **kw))
            cm.reuse_shard = lambda *x, **k: None  # the full pass
            try:
                off, off_wall, off_cpu = timed(
                    lambda u=url: cm.load_or_build_cache(model, [u], work / "off", **kw)
                )
            finally:
                cm.reuse_shard = real
            on, off = on[0], off[0]
            assert on.keys == off.keys and on.captions == off.captions
            err = (on.image["pooled"].float() - off.image["pooled"].float()).abs().max().item()
            res[name] = {
                "n": len(on), "reuse_wall_s": on_wall, "reuse_cpu_s": on_cpu, "full_wall_s": off_wall,
                "full_cpu_s": off_cpu, "cpu_ratio": round(off_cpu / max(on_cpu, 1e-3), 1), "max_abs_diff": err,
            }  # fmt: skip
            rows.append([name, len(on), on_cpu, off_cpu, f"{res[name]['cpu_ratio']}x", f"{err:.1e}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        emit_json(res)
    else:
        print(f"source: {len(samples)} samples cached in {src_cpu} CPU s ({src_wall} s wall)")
        print(format_table(rows, ["derived", "n", "reuse CPU s", "full pass CPU s", "ratio", "max |diff|"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
