"""``index build|search --runtime onnx``: the onnx export of a model builds (and searches) the same index.

An fp32 export counts as its torch model (export.runtime.model_identity), so an index built with one
runtime is found "built by this model" by the other; the vectors agree to 1e-4 (stored float16).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

QUERIES = ["a red square", "a green square", "a blue square", "something else entirely"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, nano, onnx_cache):
    """The same two shards indexed with the torch runtime and with the onnx runtime."""
    import os

    from index_testutils import write_shard

    from clipforge.index import BuildOptions, build_index

    d = tmp_path_factory.mktemp("onnx_index")
    write_shard(d / "a-000000.tar", 12, prefix="a")
    write_shard(d / "b-000001.tar", 12, prefix="b", start=12)
    out = {}
    old = os.environ.get("CLIPFORGE_CACHE")
    os.environ["CLIPFORGE_CACHE"] = str(onnx_cache.parent / "env_cache")  # build_index's default cache
    try:
        for rt in ("torch", "onnx"):
            opt = BuildOptions(batch_size=8, workers=0, runtime=rt)
            build_index(str(d / "*.tar"), nano, d / rt, opt, progress=False, threads=1)
            out[rt] = d / rt
    finally:
        if old is None:
            os.environ.pop("CLIPFORGE_CACHE", None)
        else:
            os.environ["CLIPFORGE_CACHE"] = old
    return out


def test_onnx_model_is_its_torch_model(nano, nano_onnx, onnx_cache):
    from clipforge.export.runtime import OnnxClipModel, model_identity
    from clipforge.models.encode import fingerprint

    assert isinstance(nano_onnx, OnnxClipModel)
    assert model_identity(nano_onnx) == model_identity(nano) == fingerprint(nano)
    assert fingerprint(nano_onnx) != fingerprint(nano)  # caches of raw features still tell them apart
    assert nano_onnx.directory == onnx_cache / fingerprint(nano)
    cfg = json.loads((nano_onnx.directory / "onnx_config.json").read_text())
    assert cfg["source_fingerprint"] == fingerprint(nano)


def test_cached_export_is_reused(nano, nano_onnx, onnx_cache, monkeypatch):
    import clipforge.export.api as api
    from clipforge.export.runtime import load_runtime

    def boom(*a, **kw):
        raise AssertionError("exported again although the cache holds this model's export")

    monkeypatch.setattr(api, "export_model", boom)
    again = load_runtime(nano, "onnx", threads=1, cache=onnx_cache)
    assert again.directory == nano_onnx.directory
    assert not [p for p in onnx_cache.iterdir() if p.name.endswith(".tmp")]  # no temp dir left behind


def test_broken_cache_entry_is_replaced(nano, tmp_path):
    from clipforge.export.runtime import cached_export, is_onnx_export
    from clipforge.models.encode import fingerprint

    (tmp_path / fingerprint(nano)).mkdir()
    (tmp_path / fingerprint(nano) / "image.onnx").write_bytes(b"half")  # an interrupted copy
    d = cached_export(nano, tmp_path)
    assert is_onnx_export(d) and d == tmp_path / fingerprint(nano)
    assert [p.name for p in tmp_path.iterdir()] == [fingerprint(nano)]


def test_int8_export_is_not_the_torch_model(nano, tmp_path):
    from clipforge.export import export_model
    from clipforge.export.runtime import OnnxClipModel, model_identity
    from clipforge.models.encode import fingerprint

    export_model(nano, "onnx", tmp_path / "q", quantize_int8="text")
    assert model_identity(OnnxClipModel(tmp_path / "q", 1, int8=True)) != fingerprint(nano)
    assert model_identity(OnnxClipModel(tmp_path / "q", 1)) == fingerprint(nano)


def test_runtime_choice_is_checked(nano):
    from clipforge.config import ConfigError
    from clipforge.export.runtime import load_runtime
    from clipforge.index import BuildOptions

    with pytest.raises(ValueError, match="runtime"):
        load_runtime(nano, "tensorrt")
    with pytest.raises(ConfigError, match="runtime"):
        BuildOptions.from_dict({"runtime": "tensorrt"})


def test_index_built_with_onnx_matches_torch(built):
    from clipforge.index import ClipIndex

    t, o = ClipIndex.load(built["torch"]), ClipIndex.load(built["onnx"])
    assert t.manifest["model_fingerprint"] == o.manifest["model_fingerprint"]
    assert t.model_ref == o.model_ref == "scratch:vit-nano"
    assert o.manifest["model_spec"] == "scratch:vit-nano" and o.manifest["build"]["runtime"] == "onnx"
    et, eo = np.load(built["torch"] / "embeddings.npy"), np.load(built["onnx"] / "embeddings.npy")
    assert et.shape == eo.shape and np.abs(et.astype(np.float32) - eo.astype(np.float32)).max() < 2e-3


@pytest.mark.parametrize("which", ["torch", "onnx"])
def test_either_runtime_searches_either_index(built, which, nano, nano_onnx):
    """Top-1 equal and scores within 1e-4 whichever runtime embeds the query, on either index."""
    from clipforge.index import ClipIndex
    from clipforge.models.encode import embed_texts

    index = ClipIndex.load(built[which])
    qt, qo = embed_texts(nano, QUERIES), embed_texts(nano_onnx, QUERIES)
    assert np.abs(qt - qo).max() < 1e-4
    for ht, ho in zip(index.search(qt, 5), index.search(qo, 5)):
        assert ht[0].row == ho[0].row
        st = np.array([h.score for h in ht])
        so = np.array([h.score for h in ho])
        assert np.abs(st - so).max() < 1e-4


def test_search_cli_runtime_onnx(built, monkeypatch, onnx_cache):
    from clipforge.cli import main

    monkeypatch.setenv("CLIPFORGE_CACHE", str(onnx_cache.parent / "env_cache"))
    res = {}
    for rt in ("torch", "onnx"):
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = main(["index", "search", str(built["onnx"]), "a red square", "-k", "3", "--json"])
            rc = rc or main(
                ["index", "search", str(built["torch"]), "a red square", "-k", "3", "--json"]
                + ["--runtime", rt, "--threads", "1"]
            )
        assert rc == 0
        res[rt] = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    a, b = res["torch"][1]["results"], res["onnx"][1]["results"]
    assert [r["key"] for r in a][:1] == [r["key"] for r in b][:1]
    assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b)) < 1e-4
