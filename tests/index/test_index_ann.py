"""faiss index planning (RAM budget heuristics), tuning to a target recall, recall measurement."""

from __future__ import annotations

import numpy as np
import pytest

from clipforge.index import ann


def test_plan_flat_when_small_and_fits():
    p = ann.plan_index(10_000, 512)
    assert p.kind == "flat" and p.est_bytes == 10_000 * 512 * 4


def test_plan_ivf_sized_by_budget():
    n, d = 1_000_000, 512
    roomy = ann.plan_index(n, d, ram_budget=4 << 30)
    assert roomy.kind == "ivfsq" and roomy.factory.endswith(",SQ8")  # d bytes a vector fit in 4 GB
    assert roomy.est_bytes < n * d * 4 / 3
    pq = ann.plan_index(n, d, kind="ivfpq", ram_budget=4 << 30, refine=True)
    assert pq.pq_m == 64 and pq.refine and pq.factory.endswith("Refine(SQ8)")
    assert roomy.nlist == 2048 and roomy.factory == "IVF2048,SQ8"
    tight = ann.plan_index(n, d, ram_budget=60 << 20)
    assert tight.kind == "ivfpq" and not tight.refine and tight.pq_m < 64
    assert tight.est_bytes <= 60 << 20
    with pytest.raises(ValueError, match="RAM budget"):
        ann.plan_index(n, d, ram_budget=5 << 20)
    # over budget for flat -> IVF even under the size threshold; SQ8 while its codes fit, else PQ
    assert ann.plan_index(200_000, 512, ram_budget=300 << 20).kind == "ivfsq"
    assert ann.plan_index(200_000, 512, ram_budget=80 << 20).kind == "ivfpq"
    assert ann.plan_index(200_000, 512, kind="hnsw").factory.startswith("HNSW")
    with pytest.raises(ValueError):
        ann.plan_index(10, 8, kind="bogus")


def test_parse_bytes():
    assert ann.parse_bytes("4GB") == 4 << 30
    assert ann.parse_bytes("512MiB") == 512 << 20
    assert ann.parse_bytes("1000") == 1000


def test_knn_recall():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert ann.knn_recall(truth, truth, 3) == 1.0
    assert ann.knn_recall(np.array([[1, 9, 9], [6, 5, 4]]), truth, 3) == pytest.approx(4 / 6)


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, d))
    x = centers[rng.integers(0, 64, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivfsq", "ivfpq", "hnsw"])
def test_build_and_tune_reaches_target(kind):
    x = _clustered(4000, 16)
    plan = ann.plan_index(len(x), 16, kind=kind)
    index = ann.build_faiss(x, plan)
    q = x[:200]
    truth = ann.exact_knn(q, x, 10)
    params, recall, sweep = ann.tune(index, plan, q, truth, 10, target_recall=0.9)
    assert recall >= 0.9 and sweep and sweep[-1]["recall"] == recall
    assert ("nprobe" in params) if kind.startswith("ivf") else ("efSearch" in params)
    # the chosen setting is applied: searching again gives the same recall
    assert ann.knn_recall(index.search(q, 10)[1], truth, 10) == pytest.approx(recall)
