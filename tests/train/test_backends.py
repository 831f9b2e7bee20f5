"""The trainer on the real model backends (small slices): scratch streaming, towers cached."""

from __future__ import annotations

import pytest
from train_testutils import write_slice

from clipforge.train import train


@pytest.mark.slow
def test_scratch_vit_tiny_streams_and_reloads(flickr_test_shard, tmp_path):
    shards = write_slice(flickr_test_shard, tmp_path / "s", 2, 8, corrupt=False)
    r = train(
        {
            "model": "scratch:vit-tiny",
            "data": shards,
            "output": str(tmp_path / "run"),
            "steps": 2,
            "batch_size": 4,
            "workers": 0,
            "progress": False,
            "tensorboard": False,
            "threads": 1,
        }
    )
    assert r["mode"] == "streaming" and r["steps"] == 2 and r["final_loss"] == r["final_loss"]
    from clipforge import load_model

    m = load_model(r["model_dir"])
    assert m.config.spec == "scratch:vit-tiny"


@pytest.mark.slow
def test_towers_locked_trains_heads_from_cache(flickr_test_shard, tmp_path):
    shards = write_slice(flickr_test_shard, tmp_path / "s", 1, 8, corrupt=False)
    r = train(
        {
            "model": "towers:efficientnet-lite0+minilm-l6",
            "data": shards,
            "output": str(tmp_path / "run"),
            "steps": 3,
            "batch_size": 8,
            "workers": 0,
            "progress": False,
            "tensorboard": False,
            "threads": 1,
            "loss": "siglip",
        }
    )
    assert r["mode"] == "cached" and r["samples"] == 8
    from clipforge import load_model

    m = load_model(r["model_dir"])
    assert m.logit_bias is not None
