"""Curation benchmarks (issue 5 targets). Run each once; the machine may be shared, so times are noisy.

    python benchmarks/bench_curate.py semdedup --n 1000000          # 1M x 512 fp16, planted duplicates
    python benchmarks/bench_curate.py clipscore --limit 256         # clip-score images/s, decode vs model
    python benchmarks/bench_curate.py ray --limit 2                 # Ray vs local overhead (text,image)

``semdedup``: time, peak RSS (target < 6 GiB) and recall of planted duplicates (target >= 0.99).
``clipscore``: throughput of the clip-score stage with efficientnet-lite0 + minilm-l6 on flickr8k,
and the share of time in decode+preprocess vs the model. ``ray``: wall time of the same sample
stages with ``--engine ray`` (local instance, 2 CPUs, startup included and excluded) vs local.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clipforge.utils import emit_json, format_table

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def bench_semdedup(n: int, dim: int, dups: int, threshold: float, seed: int) -> dict:
    from clipforge.curate.dedup import DedupConfig, semantic_pairs

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    emb = np.empty((n, dim), dtype=np.float16)
    for a in range(0, n, 100_000):  # generate in chunks: no 2 GiB float32 temporary
        x = rng.standard_normal((min(n, a + 100_000) - a, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb[a : a + len(x)] = x
    src = rng.choice(n - dups, dups, replace=False)
    noise = rng.standard_normal((dups, dim), dtype=np.float32) * 0.01  # cosine ~0.95-0.99 after renorm
    x = emb[src].astype(np.float32) + noise
    emb[n - dups :] = x / np.linalg.norm(x, axis=1, keepdims=True)
    t_gen = time.perf_counter() - t0
    cfg = DedupConfig(threshold=threshold, seed=seed)
    t0 = time.perf_counter()
    i, j, s = semantic_pairs(emb, cfg)
    t_dedup = time.perf_counter() - t0
    found = set(zip(i.tolist(), j.tolist()))
    planted = list(zip(src.tolist(), range(n - dups, n)))
    hit = sum((a, b) in found or (b, a) in found for a, b in planted)
    planted_set = {p for pr in planted for p in pr}
    false_pairs = sum(1 for a, b in found if a not in planted_set or b not in planted_set) // 2
    return {
        "n": n,
        "dim": dim,
        "planted": dups,
        "threshold": threshold,
        "gen_s": round(t_gen, 1),
        "dedup_s": round(t_dedup, 1),
        "recall": hit / dups,
        "false_pairs": false_pairs,
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }


def bench_clipscore(limit: int, model: str, image_size: int | None, batch: int) -> dict:
    import torch

    from clipforge.curate.config import CurateConfig
    from clipforge.curate.plan import resolve_stages
    from clipforge.curate.registry import Context
    from clipforge.curate.shard import iter_batches
    from clipforge.data.report import BadSampleReport
    from clipforge.utils import setup_torch_threads

    setup_torch_threads()
    ctx = Context(CurateConfig(stages=["clip-score"], model=model, batch_size=batch, image_size=image_size))
    stage = resolve_stages(["clip-score"])[0]
    _ = ctx.model  # load outside the timed region
    n, t0 = 0, time.perf_counter()
    for b in iter_batches(str(FLICKR / "test-000000.tar"), batch, BadSampleReport()):
        b = {k: v[: limit - n] for k, v in b.items()}
        stage.fn(b, ctx)
        n += len(b["key"])
        if n >= limit:
            break
    wall = time.perf_counter() - t0
    dec, mod = ctx.timing.get("decode_s", 0.0), ctx.timing.get("model_s", 0.0)
    return {
        "images": n,
        "images_per_s": round(n / wall, 2),
        "decode_s": round(dec, 2),
        "model_s": round(mod, 2),
        "model_frac": round(mod / max(dec + mod, 1e-9), 3),
        "threads": torch.get_num_threads(),
        "image_size": image_size or "model default",
    }


def bench_ray(limit_shards: int) -> dict:
    from clipforge.curate.config import CurateConfig
    from clipforge.curate.engine import run_curation

    shards = [str(p) for p in sorted(FLICKR.glob("train-*.tar"))[:limit_shards]]
    cfg = CurateConfig(stages=["text", "image"])
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        run_curation(shards, Path(d) / "local", cfg, engine="local", workers=2, progress=False)
        t_local = time.perf_counter() - t0
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        run_curation(shards, Path(d) / "ray", cfg, engine="ray", workers=2, progress=False)
        t_ray = time.perf_counter() - t0
        ray.shutdown()
    return {
        "shards": len(shards),
        "local_s": round(t_local, 1),
        "ray_s": round(t_ray, 1),
        "ray_init_s": round(t_init, 1),
        "ratio": round(t_ray / t_local, 2),
        "ratio_without_init": round((t_ray - t_init) / t_local, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="which", required=True)
    s = sub.add_parser("semdedup", help="SemDeDup on random embeddings with planted duplicates")
    s.add_argument("--n", type=int, default=1_000_000)
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--dups", type=int, default=10_000)
    s.add_argument("--threshold", type=float, default=0.95)
    s.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("clipscore", help="clip-score throughput on flickr8k test")
    c.add_argument("--limit", type=int, default=256)
    c.add_argument("--model", default="towers:efficientnet-lite0+minilm-l6")
    c.add_argument("--image-size", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=64)
    r = sub.add_parser("ray", help="Ray vs local engine overhead")
    r.add_argument("--limit", type=int, default=2, help="flickr train shards")
    for p in (s, c, r):
        p.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.which == "semdedup":
        res = bench_semdedup(a.n, a.dim, a.dups, a.threshold, a.seed)
    elif a.which == "clipscore":
        res = bench_clipscore(a.limit, a.model, a.image_size, a.batch_size)
    else:
        res = bench_ray(a.limit)
    if a.json:
        emit_json(res)
    else:
        print(format_table(list(res.items()), ["metric", "value"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
