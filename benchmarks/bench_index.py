"""Index build time and recall@10 of the approximate index vs exact search on synthetic vectors.

    python benchmarks/bench_index.py                       # 1M x 512 random unit vectors, 4 GB budget
    python benchmarks/bench_index.py --n 100000 --json     # quicker
    python benchmarks/bench_index.py --data clustered      # mixture of 1000 Gaussians
    python benchmarks/bench_index.py --data lowrank        # 32-d latent structure (like real embeddings)

Uses the same planner/builder/tuner as ``clipforge index build`` (clipforge.index.ann): for each RAM
budget it plans an index, trains and fills it, tunes nprobe/efSearch to ``--target-recall`` on
held-out queries and reports build seconds, recall@10 vs exact (faiss.knn brute force), ms/query
(batched) and the planner's memory estimate. Uniform random vectors on the sphere have no neighbour
structure, the hardest case for IVF/PQ (recall ~ the fraction of lists probed); real embeddings have
low intrinsic dimension, which ``--data lowrank`` imitates. 1M x 512 float32 is 2 GB.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def log(msg: str) -> None:
    print(f"[bench_index] {msg}", file=sys.stderr, flush=True)


def make_data(kind: str, n: int, d: int, nq: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.standard_normal((n + nq, d), dtype=np.float32)
    elif kind == "lowrank":  # low intrinsic dimension, like real embeddings: 32-d latent -> d, plus noise
        z = rng.standard_normal((n + nq, 32), dtype=np.float32)
        x = z @ rng.standard_normal((32, d), dtype=np.float32)
        x += 0.1 * np.sqrt(32) * rng.standard_normal((n + nq, d), dtype=np.float32)
    else:
        centers = rng.standard_normal((1000, d), dtype=np.float32)
        x = centers[rng.integers(0, 1000, n + nq)]
        x += 0.5 * rng.standard_normal((n + nq, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:n], x[n:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--data", choices=["random", "clustered", "lowrank"], default="random")
    p.add_argument("--budgets", nargs="+", default=["4GB", "256MB"], help="RAM budgets to plan for")
    p.add_argument("--hnsw", action="store_true", help="also build HNSW32 (slow to build at 1M)")
    p.add_argument("--target-recall", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import faiss

    from clipforge.index import ann
    from clipforge.utils import emit_json, format_table, write_json

    faiss.omp_set_num_threads(args.threads)
    t = time.perf_counter()
    xb, xq = make_data(args.data, args.n, args.d, args.queries, args.seed)
    log(f"{args.data} data {xb.shape} in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    truth = ann.exact_knn(xq, xb, 10)
    exact_s = time.perf_counter() - t
    log(f"exact ground truth for {len(xq)} queries: {exact_s:.1f}s")
    rows = [
        {
            "index": "Flat (exact)",
            "budget": "-",
            "build_s": 0.0,
            "params": {},
            "recall@10": 1.0,
            "ms_per_query": exact_s * 1000 / len(xq),
            "est_MB": args.n * args.d * 4 / 1e6,
        }
    ]
    # what `clipforge index build` would pick for a collection this size at each budget
    plans = [
        (b, ann.plan_index(args.n, args.d, "auto", ann.parse_bytes(b), flat_threshold=0))
        for b in args.budgets
    ]
    if args.hnsw:
        plans.append(("-", ann.plan_index(args.n, args.d, "hnsw")))
    for budget, plan in plans:
        log(f"building {plan.factory} (budget {budget}, ~{plan.est_bytes / 1e6:.0f} MB)")
        t = time.perf_counter()
        index = ann.build_faiss(xb, plan, seed=args.seed)
        build_s = time.perf_counter() - t
        params, recall, sweep = ann.tune(index, plan, xq, truth, 10, args.target_recall)
        row = {
            "index": plan.factory,
            "budget": budget,
            "build_s": build_s,
            "params": params,
            "recall@10": recall,
            "ms_per_query": sweep[-1]["ms_per_query"] if sweep else float("nan"),
            "est_MB": plan.est_bytes / 1e6,
            "sweep": sweep,
        }
        log(f"{plan.factory}: build {build_s:.1f}s, {params}, recall@10 {recall:.3f}")
        rows.append(row)
        del index
    result = {"n": args.n, "d": args.d, "data": args.data, "queries": args.queries, "threads": args.threads}
    result["results"] = rows
    if args.out:
        write_json(args.out, result)
    if args.json:
        emit_json(result)
    else:
        table = [
            [
                r["index"],
                r["budget"],
                round(r["build_s"], 1),
                str(r["params"]),
                r["recall@10"],
                r["ms_per_query"],
                round(r["est_MB"]),
            ]
            for r in rows
        ]
        print(
            format_table(table, ["index", "budget", "build_s", "params", "recall@10", "ms/query", "est_MB"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
