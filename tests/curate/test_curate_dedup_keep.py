"""Dedup's keep choice: with out-of-fold clip scores (``curate run --folds K``) the duplicate kept is the
one the out-of-fold scorer likes best, not the one an in-sample score (which rates memorized pairs as
good ones) or the row order picks; without them the old rule holds."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from clipforge.curate.dedup import dedup_stage
from clipforge.curate.stages import Context, CurateConfig


def table():
    return pa.table(
        {
            "key": ["a", "b", "c", "d"],
            "sha256": ["x", "x", "x", "z"],  # a, b, c: one exact-duplicate group
            "clip_score": [0.9, 0.1, 0.2, 0.5],  # in sample: a looks best
        }
    )


def test_out_of_fold_scores_choose_the_keeper():
    ctx = Context(CurateConfig())
    ctx.keep_scores = {"a": -0.2, "b": 0.4, "c": 0.1, "d": 0.3}
    out = dedup_stage(table(), {}, ctx)
    assert out["dup_of"] == ["b", None, "b", None] and out["exact_dup_of"] == ["b", None, "b", None]
    assert out["__stats__"]["keep_by"] == "clip_score (oof)"
    ctx.keep_scores = {"c": 0.0}  # keys without an out-of-fold score rank last
    assert dedup_stage(table(), {}, ctx)["dup_of"] == ["c", "c", None, None]


def test_without_them_the_table_clip_score_or_centroid_decides():
    ctx = Context(CurateConfig())
    out = dedup_stage(table(), {}, ctx)
    assert out["dup_of"] == [None, "a", "a", None] and out["__stats__"]["keep_by"] == "clip_score"
    e = np.eye(4, dtype=np.float32)
    out = dedup_stage(table().drop(["clip_score"]), {"image": e}, ctx)
    assert out["__stats__"]["keep_by"] == "centroid"


def test_curate_run_folds_passes_the_oof_scores_to_dedup(tmp_path, monkeypatch):
    """``run_with_folds`` hands OUT/folds/oof.parquet to the engine (the folds themselves are faked)."""
    import argparse

    import pyarrow.parquet as pq

    import clipforge.curate.engine as engine
    import clipforge.curate.folds as folds
    from clipforge.curate.cli import run_with_folds

    seen = {}

    def fake_folds(data, out, cfg, threads=None):
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"key": ["a"], "fold": [0], "clip_score": [0.5]}), out / "oof.parquet")
        return {"k": 2}

    def fake_curation(data, out, cfg, **kw):
        seen.update(kw)
        (out / "scores.parquet").parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"key": ["a"], "shard": ["s"]}), out / "scores.parquet")
        return {}

    monkeypatch.setattr(folds, "run_folds", fake_folds)
    monkeypatch.setattr(engine, "run_curation", fake_curation)
    monkeypatch.setattr(engine, "open_run_dir", lambda *a, **k: None)
    cfg = CurateConfig(stages=["image", "dedup"])
    cfg.folds.k = 2
    args = argparse.Namespace(output=str(tmp_path / "o"), data=["x.tar"], threads=1, engine="local", workers=1,
                              eval_data=None, ray_address=None, overwrite=False)  # fmt: skip
    monkeypatch.setattr("clipforge.data.shards.expand_shards", lambda d: list(d))
    run_with_folds(args, cfg)
    assert seen["keep_scores"] == {"a": 0.5}
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["folds"]["k"] == 2
