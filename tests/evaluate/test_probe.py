"""Linear probe: separable -> 100%, shuffled labels -> chance, solvers agree, split is as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipforge.evaluate.probe import linear_probe, sample_k_shot
from clipforge.evaluate.recipes import probe_split


def make(n: int, d: int, c: int, sep: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    proto = torch.randn(c, d, generator=torch.Generator().manual_seed(123))
    x = sep * proto[y] + torch.randn(n, d, generator=g)
    return x, y


def splits(x, y):
    n = len(y)
    a, b = n // 2, n // 2 + n // 5
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_separable_reaches_100(solver: str) -> None:
    x, y = make(400, 16, 4, sep=6.0, seed=0)
    r = linear_probe(*splits(x, y), 4, solver=solver)
    assert r["top1"] == 1.0 and r["mean_per_class_recall"] == 1.0
    assert r["refit_on"] == "train+val" and r["n_train"] == 200


def test_shuffled_labels_are_chance() -> None:
    x, y = make(600, 16, 4, sep=6.0, seed=1)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    r = linear_probe(*splits(x, y), 4)
    assert abs(r["top1"] - 0.25) < 0.1


def test_solvers_agree() -> None:
    x, y = make(600, 24, 5, sep=0.6, seed=2)
    a = linear_probe(*splits(x, y), 5, solver="torch")
    b = linear_probe(*splits(x, y), 5, solver="sklearn")
    assert a["best_C"] == pytest.approx(b["best_C"], rel=0.8)
    assert abs(a["top1"] - b["top1"]) <= 0.02
    assert 0.4 < a["top1"] < 1.0  # a problem where regularization matters


def test_k_shot() -> None:
    x, y = make(400, 16, 4, sep=6.0, seed=3)
    r = linear_probe(*splits(x, y), 4, k_shot=3)
    assert r["n_train"] == 12 and r["refit_on"] == "train" and r["top1"] > 0.9
    idx = sample_k_shot(y, 5, seed=0)
    assert torch.bincount(y[idx]).tolist() == [5, 5, 5, 5]
    assert torch.equal(idx, sample_k_shot(y, 5, seed=0)) and not torch.equal(idx, sample_k_shot(y, 5, seed=1))


def test_probe_split_documented_sizes() -> None:
    labels = np.repeat(np.arange(10), 1000)
    keys = [f"{i:05d}" for i in range(10000)]
    tr, va, te = probe_split(labels, keys)
    assert (len(tr), len(va), len(te)) == (5000, 1000, 4000)
    assert len(set(tr) | set(va) | set(te)) == 10000
    assert all((np.bincount(labels[s]) == n).all() for s, n in ((tr, 500), (va, 100), (te, 400)))
    # depends on keys, not on row order: permuting rows permutes the split identically
    perm = np.random.default_rng(5).permutation(10000)
    tr2, _, _ = probe_split(labels[perm], [keys[i] for i in perm])
    assert sorted(keys[i] for i in tr) == sorted(keys[perm[i]] for i in tr2)
    with pytest.raises(ValueError):
        probe_split(labels, keys, (0.5, 0.5, 0.5))
