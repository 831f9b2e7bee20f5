"""The clip-score cut without labels: a 2-Gaussian mixture per caption-length bucket (issue 13)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.curate.filter import FilterError, apply_filters, parse
from clipforge.curate.threshold import auto_threshold, fit_mixture


def known_mixture(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Scores of clean pairs ~ N(0.30 + 0.01 * words/4, 0.03), noisy ~ N(0.12, 0.04); captions of 4-20 words."""
    rng = np.random.default_rng(seed)
    words = rng.integers(4, 21, n)
    is_noise = rng.random(n) < noise
    clean = rng.normal(0.30 + 0.01 * words / 4, 0.03)
    scores = np.where(is_noise, rng.normal(0.12, 0.04, n), clean)
    captions = [" ".join(["w"] * int(k)) for k in words]
    return scores, captions, is_noise


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_mixture_recovers_known_noise_rate(noise):
    scores, captions, is_noise = known_mixture(4000, noise)
    fit = fit_mixture(scores)
    assert abs(fit["noise_rate"] - noise) < 0.03 and fit["bimodal"]
    assert 0.15 < fit["cut"] < 0.28
    res = auto_threshold(scores, captions, n_buckets=4, min_bucket=200)
    assert abs(res["noise_rate"] - noise) < 0.03
    assert len(res["buckets"]) >= 3 and all(b["fit"] == "own" for b in res["buckets"])
    below = scores < res["cuts"]
    assert (below == is_noise).mean() > 0.97  # the cut separates the two populations


def test_unimodal_scores_are_flagged_and_small_buckets_pool():
    rng = np.random.default_rng(1)
    fit = fit_mixture(rng.normal(0.3, 0.03, 3000))
    assert not fit["bimodal"]
    scores, captions, _ = known_mixture(500, 0.2)
    res = auto_threshold(scores, captions, n_buckets=4, min_bucket=400)
    assert all(b["fit"].startswith("pooled") for b in res["buckets"])
    with pytest.raises(ValueError, match="at least 10"):
        fit_mixture(np.array([0.1, 0.2, np.nan]))


def test_filter_auto_and_threshold_command(tmp_path, capsys):
    scores, captions, is_noise = known_mixture(2000, 0.25, seed=2)
    vals = [None if i == 0 else float(s) for i, s in enumerate(scores)]  # one null: never kept
    table = pa.table({"key": [f"k{i}" for i in range(len(vals))], "caption": captions, "clip_score": vals})
    mask, counts = apply_filters(table, ["clip_score > auto"])
    assert not mask[0] and abs(mask[1:].mean() - (1 - is_noise[1:].mean())) < 0.03
    low, _ = apply_filters(table, ["clip_score <= auto"])
    assert not (mask & low).any() and not low[0]
    assert parse("clip_score > auto") == ("auto", ">", "clip_score")
    with pytest.raises(FilterError, match="'auto' is a cut"):
        apply_filters(table, ["clip_score == auto"])
    with pytest.raises(FilterError, match="numeric"):
        apply_filters(table, ["caption > auto"])
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(table, run / "scores.parquet")
    from clipforge.cli import main

    assert main(["curate", "threshold", "--scores", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["noise_rate"] - 0.25) < 0.03 and out["column"] == "clip_score"
    assert main(["curate", "threshold", "--scores", str(tmp_path / "none")]) == 2
    assert main(["curate", "threshold", "--scores", str(run), "--column", "nope"]) == 2
