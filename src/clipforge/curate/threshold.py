"""A clip-score cut chosen without ground truth: a two-component Gaussian mixture per caption-length bucket.

Why: a fixed ``clip_score > 0.28`` is a number from someone else's model and data, and "keep the top
30%" assumes the noise rate. Mismatched pairs score like a second, lower mode of the distribution, so
fitting two Gaussians (noise = the lower-mean component) gives both a cut (where the posterior of the
noise component is 1/2) and an estimate of the noise rate (its weight), with no label and no injected
rate. Scores depend on caption length (short captions score lower), so the fit is done per bucket of
caption word counts (quantile edges), falling back to the pooled fit for buckets smaller than
``min_bucket``. When one Gaussian explains the scores about as well as two (BIC), the result says
``bimodal: false``: the cut is then a guess, not a measurement.

Used by ``clipforge curate threshold --scores DIR`` (the report) and by filter expressions
``clip_score > auto`` / ``clip_score < auto`` (:mod:`clipforge.curate.filter`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_BUCKETS = 4
MIN_BUCKET = 200
MIN_FIT = 10  # fewer finite scores than this cannot be fitted (a smaller bucket always pools)


def fit_mixture(scores: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Two-component 1-D Gaussian mixture -> cut, noise rate (low component's weight) and the components."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(scores, dtype=np.float64)
    x = x[np.isfinite(x)].reshape(-1, 1)
    if len(x) < MIN_FIT:
        raise ValueError(f"a mixture fit needs at least {MIN_FIT} scores, got {len(x)}")
    if np.ptp(x) == 0:  # one value: no second mode to find (a fit would invent one); nothing below the cut
        v = float(x[0, 0])
        return {
            "n": int(len(x)),
            "cut": v,
            "noise_rate": 0.0,
            "below_cut": 0.0,
            "bimodal": False,
            "noise": {"mean": v, "std": 0.0, "weight": 0.0},
            "clean": {"mean": v, "std": 0.0, "weight": 1.0},
        }
    try:
        gm = GaussianMixture(2, n_init=3, random_state=seed).fit(x)
        gm1 = GaussianMixture(1, random_state=seed).fit(x)
    except ValueError as e:  # e.g. scores so large that the variances overflow
        raise ValueError(
            f"mixture fit failed on {len(x)} scores in [{x.min():.4g}, {x.max():.4g}]: {e}"
        ) from None
    mu = gm.means_.ravel()
    sd = np.sqrt(gm.covariances_.ravel())
    w = gm.weights_.ravel()
    lo, hi = int(np.argmin(mu)), int(np.argmax(mu))
    # cut: where the noise posterior crosses 1/2 between the two means (a fine grid; 1-D, cheap)
    grid = np.linspace(mu[lo], mu[hi], 2001).reshape(-1, 1)
    post = gm.predict_proba(grid)[:, lo]
    below = np.flatnonzero(post < 0.5)
    cut = float(grid[below[0], 0]) if len(below) else float((mu[lo] + mu[hi]) / 2)
    return {
        "n": int(len(x)),
        "cut": cut,
        "noise_rate": float(w[lo]),
        "below_cut": float((x[:, 0] < cut).mean()),
        "bimodal": bool(gm.bic(x) + 10 < gm1.bic(x)),
        "noise": {"mean": float(mu[lo]), "std": float(sd[lo]), "weight": float(w[lo])},
        "clean": {"mean": float(mu[hi]), "std": float(sd[hi]), "weight": float(w[hi])},
    }


def caption_lengths(captions: list[str | None]) -> np.ndarray:
    """Word counts; a null or non-text caption counts 0 words (a score table is untrusted data)."""
    return np.array([len(c.split()) if isinstance(c, str) else 0 for c in captions], dtype=np.int64)


def bucket_edges(lengths: np.ndarray, n_buckets: int) -> list[float]:
    """Quantile edges of caption word counts (deduplicated): bucket b holds edges[b] <= len < edges[b+1]."""
    qs = np.quantile(lengths, np.linspace(0, 1, n_buckets + 1)[1:-1]) if len(lengths) else []
    return [-np.inf, *sorted(set(float(np.ceil(q)) for q in qs)), np.inf]


def auto_threshold(
    scores: np.ndarray,
    captions: list[str | None] | None = None,
    n_buckets: int = DEFAULT_BUCKETS,
    min_bucket: int = MIN_BUCKET,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-row cut (``cuts``, NaN where the score is null) and the per-bucket fits behind it.

    ``noise_rate`` overall is the bucket noise weights averaged by bucket size.
    """
    s = np.asarray(scores, dtype=np.float64)
    ok = np.isfinite(s)
    pooled = fit_mixture(s[ok], seed)
    cuts = np.full(len(s), np.nan)
    buckets = []
    if captions is None or n_buckets <= 1:
        cuts[ok] = pooled["cut"]
        buckets.append({"words": "all", "fit": "pooled", **pooled})
    else:
        lengths = caption_lengths(captions)
        edges = bucket_edges(lengths[ok], n_buckets)
        for a, b in zip(edges[:-1], edges[1:]):
            rows = ok & (lengths >= a) & (lengths < b)
            if not rows.any():
                continue
            fit, how = pooled, "pooled (bucket < min_bucket)"
            if rows.sum() >= max(min_bucket, MIN_FIT):
                fit, how = fit_mixture(s[rows], seed), "own"
            cuts[rows] = fit["cut"]
            label = f"{'' if np.isinf(a) else int(a)}..{'' if np.isinf(b) else int(b) - 1}"
            buckets.append({"words": label, "rows": int(rows.sum()), "fit": how, **fit})
    sizes = np.array([b.get("rows", pooled["n"]) for b in buckets], dtype=np.float64)
    rate = float((sizes * np.array([b["noise_rate"] for b in buckets])).sum() / max(1.0, sizes.sum()))
    return {
        "n": int(ok.sum()),
        "noise_rate": rate,
        "below_cut": float((s[ok] < cuts[ok]).mean()) if ok.any() else 0.0,
        "pooled": pooled,
        "buckets": buckets,
        "cuts": cuts,
    }


def table_auto_threshold(table: Any, column: str = "clip_score", **kw: Any) -> dict[str, Any]:
    """:func:`auto_threshold` of a score table's column, bucketed by its ``caption`` column when present."""
    vals = table.column(column).to_pylist()
    scores = np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
    caps = table.column("caption").to_pylist() if "caption" in table.column_names else None
    return auto_threshold(scores, caps, **kw)
