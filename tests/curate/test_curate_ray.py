"""The Ray engine gives the same columns and values as the local engine (local Ray, 2 CPUs)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipforge.curate.engine import run_curation
from clipforge.curate.stages import CurateConfig

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    os.environ.get("CLIPFORGE_RAY_PROCESS") != "1",
    reason="run in their own process by tests/test_ray_process.py (Ray's threads make later forks unsafe)",
)


@pytest.fixture(scope="module")
def ray_local():
    import curate_testutils

    import fake_clip

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    for m in (fake_clip, curate_testutils):  # test model classes (and their shared base) travel by value
        ray.cloudpickle.register_pickle_by_value(m)
    yield
    ray.shutdown()


def test_ray_matches_local(ray_local, shards, tmp_path, tiny_model):
    stages = ["clip-score", "text", "image", "dedup"]
    cfg = CurateConfig(stages=stages, batch_size=4)
    loc = run_curation([str(s) for s in shards], tmp_path / "local", cfg, model=tiny_model, progress=False)
    ray_s = run_curation(
        [str(s) for s in shards],
        tmp_path / "ray",
        cfg,
        model=tiny_model,
        engine="ray",
        workers=2,
        progress=False,
    )
    assert ray_s["rows"] == loc["rows"] == 20 and ray_s["shards_scored"] == 2
    a = pq.read_table(tmp_path / "local" / "scores.parquet")
    b = pq.read_table(tmp_path / "ray" / "scores.parquet")
    assert a.column_names == b.column_names
    for c in a.column_names:
        va, vb = a.column(c).to_pylist(), b.column(c).to_pylist()
        if c == "clip_score":
            assert np.allclose(
                np.array(va, dtype=float), np.array(vb, dtype=float), atol=1e-4, equal_nan=True
            )
        else:
            assert va == vb, c
    again = run_curation(
        [str(s) for s in shards],
        tmp_path / "ray",
        cfg,
        model=tiny_model,
        engine="ray",
        workers=2,
        progress=False,
    )
    assert again["shards_resumed"] == 2
