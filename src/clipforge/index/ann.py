"""Which faiss index to build, sized by a RAM budget, and how to tune it against exact search.

The choice follows autofaiss's reasoning without its dependency (autofaiss pins numpy<2):

* exact ``Flat`` inner product while the collection is small (``flat_threshold``) and fits the budget:
  exact, no training, and a batched GEMM over a few hundred thousand rows is fast enough;
* otherwise ``IVF{nlist},SQ8`` when d bytes per vector fit the budget: ``nlist`` ~ 4*sqrt(n) (a power
  of two, >= 39 training points per list); 8-bit scalar codes keep inner products to ~1e-3, so recall is
  limited only by ``nprobe``, for a quarter of Flat's memory. (PQ64 + an SQ8 re-ranking copy costs more
  and, measured on 1M clustered vectors, plateaus at recall@10 0.37: its 4k candidates miss the truth);
* else ``IVF{nlist},PQ{m}``: the largest PQ code (``m`` bytes per vector) whose codes + ids +
  centroids fit (with a ``Refine(SQ8)`` copy when ``ivfpq`` is requested and it fits);
* ``HNSW32`` on request (fast, high recall, but full vectors + graph in RAM and a slow build).

The runtime knob (``nprobe`` / ``efSearch``) is then tuned on sample queries to the smallest value
that reaches ``target_recall`` of exact top-k, and the measured recall is recorded in the manifest.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from clipforge.index.config import parse_bytes  # noqa: F401  (old home)

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivfsq", "ivfpq", "hnsw")
PQ_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4)


@dataclass
class IndexPlan:
    kind: str  # flat | ivfsq | ivfpq | hnsw
    factory: str  # faiss.index_factory string
    est_bytes: int
    reason: str
    nlist: int = 0
    pq_m: int = 0
    refine: bool = False
    hnsw_m: int = 0
    train_size: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # tuned runtime parameters

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def plan_index(
    n: int,
    d: int,
    kind: str = "auto",
    ram_budget: int = 4 << 30,
    flat_threshold: int = 200_000,
    refine: bool | None = None,
) -> IndexPlan:
    """Pick the index type and its parameters for ``n`` vectors of dim ``d`` within ``ram_budget`` bytes."""
    if kind not in KINDS:
        raise ValueError(f"index type must be one of {KINDS}, got {kind!r}")
    if n <= 0:
        raise ValueError("cannot build an index over zero vectors")
    flat_bytes = n * d * 4
    if kind == "flat" or (kind == "auto" and n <= flat_threshold and flat_bytes <= ram_budget):
        why = "requested" if kind == "flat" else f"n={n} <= flat_threshold={flat_threshold} and fits"
        if flat_bytes > ram_budget:
            log.warning("flat index needs %.2f GB > RAM budget %.2f GB", flat_bytes / 1e9, ram_budget / 1e9)
        return IndexPlan("flat", "Flat", flat_bytes, f"exact search ({why})")
    if kind == "hnsw":
        m = 32
        est = int(n * (d * 4 + m * 2 * 4) * 1.1)
        return IndexPlan("hnsw", f"HNSW{m},Flat", est, "requested", hnsw_m=m, train_size=0)
    if n < 1000:
        raise ValueError(f"IVF needs >= 1000 vectors to train (have {n}); use --index-type flat")
    nlist = min(_pow2_floor(4 * math.sqrt(n)), max(1, _pow2_floor(n / 39)))
    centroid_bytes = nlist * d * 4
    train = min(n, max(50 * nlist, 256 * 39))
    sq_bytes = n * (d + 8) + centroid_bytes
    if kind == "ivfsq" or (kind == "auto" and sq_bytes <= ram_budget):
        why = "requested" if kind == "ivfsq" else f"n={n} > flat_threshold={flat_threshold}; SQ8 codes fit"
        if sq_bytes > ram_budget:
            log.warning("IVF-SQ8 needs %.2f GB > RAM budget %.2f GB", sq_bytes / 1e9, ram_budget / 1e9)
        return IndexPlan("ivfsq", f"IVF{nlist},SQ8", sq_bytes, why, nlist=nlist, train_size=train)
    m_fit = [
        m for m in PQ_CHOICES if d % m == 0 and 2 * m <= d and n * (m + 8) + centroid_bytes <= ram_budget
    ]
    if not m_fit:
        smallest = min((m for m in PQ_CHOICES if d % m == 0 and 2 * m <= d), default=1)
        raise ValueError(
            f"no IVF-PQ configuration fits the RAM budget ({ram_budget / 1e9:.2f} GB) for n={n}, d={d}: "
            f"the smallest code needs {(n * (smallest + 8) + centroid_bytes) / 1e9:.2f} GB"
        )
    m = m_fit[0]
    est = n * (m + 8) + centroid_bytes
    use_refine = refine if refine is not None else est + n * d <= ram_budget  # only when asked for ivfpq
    # "np": skip polysemous training (slow, and only useful for Hamming-filtered search)
    factory = f"IVF{nlist},PQ{m}np" + (",Refine(SQ8)" if use_refine else "")
    if use_refine:
        est += n * d
    why = "requested" if kind == "ivfpq" else f"SQ8 codes ({sq_bytes / 1e9:.2f} GB) over the RAM budget"
    return IndexPlan("ivfpq", factory, est, why, nlist=nlist, pq_m=m, refine=use_refine, train_size=train)


def build_faiss(x: np.ndarray, plan: IndexPlan, seed: int = 0) -> Any:
    """Train (on a random sample) and fill the index; ``x`` is float32 unit rows."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    index = faiss.index_factory(d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=min(n, plan.train_size or n), replace=False))]
        t = time.perf_counter()
        index.train(sample)
        log.info("trained %s on %d vectors in %.1fs", plan.factory, len(sample), time.perf_counter() - t)
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 40
    step = 65536
    for i in range(0, n, step):
        index.add(x[i : i + step])
    return index


def set_params(index: Any, params: dict[str, Any]) -> None:
    """Apply runtime parameters (nprobe, efSearch, k_factor_rf) through faiss's ParameterSpace."""
    import faiss

    ps = faiss.ParameterSpace()
    for k, v in params.items():
        ps.set_index_parameter(index, k, v)


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int) -> np.ndarray:
    """Ground-truth ids [nq, k] by brute-force inner product."""
    import faiss

    _, ids = faiss.knn(
        np.ascontiguousarray(xq, np.float32),
        np.ascontiguousarray(xb, np.float32),
        k,
        faiss.METRIC_INNER_PRODUCT,
    )
    return ids


def knn_recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:k] & truth[:k]| / k over queries (k-NN recall, the autofaiss/ann-benchmarks measure)."""
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (k * len(truth)) if len(truth) else 1.0


def tune(
    index: Any, plan: IndexPlan, xq: np.ndarray, truth: np.ndarray, k: int = 10, target_recall: float = 0.95
) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """Smallest nprobe/efSearch reaching ``target_recall`` on the sample queries.

    Returns (params, recall, sweep) where sweep lists every setting tried with its recall and ms/query.
    """
    if plan.kind == "flat":
        found = index.search(np.ascontiguousarray(xq, np.float32), k)[1]
        return {}, knn_recall(found, truth, k), []
    if plan.kind in ("ivfsq", "ivfpq"):
        name, values = "nprobe", [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if v <= plan.nlist]
    else:
        name, values = "efSearch", [16, 32, 64, 128, 256, 512]
    base: dict[str, Any] = {"k_factor_rf": 4} if plan.refine else {}
    sweep: list[dict[str, Any]] = []
    best: tuple[dict[str, Any], float] | None = None
    for v in values:
        params = {**base, name: v}
        set_params(index, params)
        t = time.perf_counter()
        found = index.search(np.ascontiguousarray(xq, np.float32), k)[1]
        ms = (time.perf_counter() - t) * 1000 / max(1, len(xq))
        r = knn_recall(found, truth, k)
        sweep.append({**params, "recall": r, "ms_per_query": ms})
        best = (params, r)
        if r >= target_recall:
            break
    assert best is not None
    set_params(index, best[0])
    return best[0], best[1], sweep
