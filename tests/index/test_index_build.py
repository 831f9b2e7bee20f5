"""Index build: layout, resume by shard, bad-sample counting, search correctness, filters, dims."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipforge.index import BuildOptions, ClipIndex, FilterError, build_index
from clipforge.index.store import Hit
from clipforge.models.encode import embed_pil_images as embed_images
from clipforge.models.encode import embed_texts


def _opts(**kw):
    return BuildOptions(batch_size=16, workers=0, **kw)


def test_build_layout_and_self_search(tmp_path, tiny_model, shard_dir):
    out = tmp_path / "idx"
    mf = build_index(str(shard_dir), tiny_model, out, _opts(), progress=False)
    assert mf["count"] == 59  # 60 samples, one corrupt JPEG skipped and counted
    assert mf["bad_samples"]["counts"] == {"corrupt_image": 1}
    assert mf["index"]["kind"] == "flat"
    for f in ("manifest.json", "embeddings.npy", "meta.parquet", "thumbs.parquet", "index.faiss"):
        assert (out / f).is_file(), f
    emb = np.load(out / "embeddings.npy")
    assert emb.dtype == np.float16 and emb.shape == (59, 32)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    idx = ClipIndex.load(out)
    rows = idx.rows(list(range(idx.count)))
    assert {r["key"] for r in rows} == {f"a{i:04d}" for i in range(30) if i != 7} | {
        f"b{i:04d}" for i in range(30, 60)
    }
    # querying with a stored embedding returns that row first with cosine ~1
    q = emb[[3, 40]].astype(np.float32)
    hits = idx.search(q, k=5)
    assert [h[0].row for h in hits] == [3, 40]
    assert all(abs(h[0].score - 1.0) < 1e-2 for h in hits)
    assert all(len(h) == 5 for h in hits)
    # metadata comes through: caption from .txt, label from .json, extra scalar json fields as columns
    r = idx.results(hits[0])[0]
    assert r["caption"].startswith("a ") and r["label"] in (0, 1, 2) and isinstance(r["n"], int)
    # a thumbnail is a JPEG
    assert idx.thumbnail(r["uid"])[:2] == b"\xff\xd8"
    assert idx.thumbnail("nope") is None


def test_image_query_matches_its_own_embedding(tmp_path, tiny_model, shard_dir):
    from clipforge.data.decode import decode_image
    from clipforge.data.reader import iter_tar_samples

    out = tmp_path / "idx"
    build_index(str(shard_dir / "b-000001.tar"), tiny_model, out, _opts(), progress=False)
    idx = ClipIndex.load(out)
    raw = next(iter(iter_tar_samples(str(shard_dir / "b-000001.tar"))))
    q = embed_images(tiny_model, [decode_image(raw["jpg"])])
    top = idx.results(idx.search(q, k=1)[0])[0]
    assert top["key"] == raw["__key__"] and top["score"] > 0.99
    # text queries work and return k ranked results with descending scores
    res = idx.search(embed_texts(tiny_model, ["a red square"]), k=7)[0]
    assert len(res) == 7 and all(a.score >= b.score for a, b in zip(res, res[1:]))


def test_resume_skips_complete_parts(tmp_path, tiny_model, shard_dir, monkeypatch):
    out = tmp_path / "idx"
    build_index(str(shard_dir), tiny_model, out, _opts(), progress=False)
    first = np.load(out / "embeddings.npy")
    # drop one part's completion record: only that shard is re-embedded on rerun
    parts = sorted((out / "parts").glob("*.json"))
    assert len(parts) == 2
    parts[1].unlink()
    import clipforge.models.encode as encode_mod

    calls = []
    real = encode_mod.encode_shards

    def spy(model, shards, *a, **kw):
        calls.append(shards[0])
        return real(model, shards, *a, **kw)

    monkeypatch.setattr(encode_mod, "encode_shards", spy)
    mf = build_index(str(shard_dir), tiny_model, out, _opts(), progress=False)
    assert len(calls) == 1 and calls[0].endswith("b-000001.tar")
    np.testing.assert_array_equal(np.load(out / "embeddings.npy"), first)
    assert mf["count"] == 59
    # a different thumbnail setting invalidates parts -> both shards re-embedded
    calls.clear()
    build_index(str(shard_dir), tiny_model, out, _opts(thumb_size=64), progress=False)
    assert len(calls) == 2


def test_filters(tmp_path, tiny_model, shard_dir):
    out = tmp_path / "idx"
    build_index(str(shard_dir), tiny_model, out, _opts(), progress=False)
    idx = ClipIndex.load(out)
    q = embed_texts(tiny_model, ["a blue square"])
    hits = idx.search(q, k=50, filters={"label": 2})[0]
    labels = {r["label"] for r in idx.rows([h.row for h in hits])}
    assert labels == {2} and len(hits) == 20  # 20 blue squares (none corrupt)
    two = idx.search(q, k=100, filters={"classname": ["red", "green"], "shard": "b-000001.tar"})[0]
    rows = idx.rows([h.row for h in two])
    assert len(rows) == 20 and {r["classname"] for r in rows} == {"red", "green"}
    # the exact-subset path and the faiss over-fetch path agree
    idx.exact_filter_limit = 0
    over = idx.search(q, k=5, filters={"label": 2})[0]
    assert [h.row for h in over] == [h.row for h in hits[:5]]
    with pytest.raises(FilterError):
        idx.search(q, k=5, filters={"nosuchcol": 1})
    with pytest.raises(FilterError):
        idx.search(q, k=5, filters={"label": "not-an-int"})
    assert idx.search(q, k=5, filters={"label": 9})[0] == []


def test_dims_truncation_records_recall(tmp_path, tiny_model, shard_dir):
    out = tmp_path / "idx"
    mf = build_index(str(shard_dir), tiny_model, out, _opts(dims=8), progress=False)
    assert mf["dim"] == 8 and mf["embed_dim"] == 32
    r = mf["dims"]["recall@10_exact_truncated_vs_full"]
    assert 0.0 < r < 1.0  # 8 of 32 random dims loses neighbours: the loss is measured, not assumed
    idx = ClipIndex.load(out)
    emb = np.load(out / "embeddings.npy").astype(np.float32)
    hits = idx.search(emb[:2], k=3)
    assert [h[0].row for h in hits] == [0, 1] and isinstance(hits[0][0], Hit)
    with pytest.raises(ValueError):
        build_index(str(shard_dir), tiny_model, tmp_path / "bad", _opts(dims=64), progress=False)


def test_manifest_is_json_and_max_per_shard(tmp_path, tiny_model, shard_dir):
    out = tmp_path / "idx"
    build_index(str(shard_dir), tiny_model, out, _opts(max_per_shard=5), progress=False)
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["count"] == 10 and [s["count"] for s in mf["shards"]] == [5, 5]
    assert mf["model"] == "test:tiny" and mf["index"]["recall@10"] == pytest.approx(1.0)


def test_chunked_text_encoding_matches_one_batch(tiny_model):
    texts = [f"word {'x ' * (i % 7)} number {i}" for i in range(21)]
    chunked = embed_texts(tiny_model, texts, batch_size=4)
    whole = embed_texts(tiny_model, texts, batch_size=100)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    single = np.concatenate([embed_texts(tiny_model, [t]) for t in texts[:3]])
    np.testing.assert_allclose(chunked[:3], single, atol=1e-5)


def test_duplicate_keys_get_unique_ids():
    from clipforge.index.build import assign_uids

    uids, dup = assign_uids(["a", "b", "a", "a~2", "a"])
    assert len(set(uids)) == 5 and dup == 2
    assert uids[:2] == ["a", "b"] and uids[3] == "a~2"  # a real key keeps its name
