"""Retrieval grid PNG and the runner's reuse of embeddings (images dict in/out, headline metrics)."""

from __future__ import annotations

from pathlib import Path

from clipforge.evaluate.embed import embed_images
from clipforge.evaluate.grid import fetch_images, retrieval_grid
from clipforge.evaluate.recipes import DatasetSpec
from clipforge.evaluate.runner import evaluate, headline_metrics


def test_grid_png_and_fetch(proto_model, color_shards, tmp_path: Path) -> None:
    shards, _ = color_shards
    spec = [str(s) for s in shards]
    imgs = embed_images(proto_model, spec, labels=True, captions=True, workers=0, progress=False)
    out = retrieval_grid(proto_model, imgs, spec, ["a red thing", "something blue"], tmp_path / "g.png", k=4)
    assert out.read_bytes()[:4] == b"\x89PNG"
    got = fetch_images(spec, {imgs.keys[0], imgs.keys[-1], "missing"})
    assert set(got) == {imgs.keys[0], imgs.keys[-1]} and got[imgs.keys[0]].mode == "RGB"


def test_evaluate_reuses_and_returns_images(proto_model, color_shards) -> None:
    shards, cn = color_shards
    spec = DatasetSpec("colors", [str(s) for s in shards], str(cn), "simple", ("zeroshot", "probe"))
    cache: dict = {}
    rep = evaluate(proto_model, [spec], images=cache, workers=0, progress=False)
    assert set(cache) == {"colors"} and len(cache["colors"]) == 34
    h = headline_metrics(rep)
    assert h["colors/zeroshot/top1"] == 1.0 and "colors/probe/top1" in h
    calls = []
    orig = proto_model.encode_image
    proto_model.encode_image = lambda *a, **k: calls.append(1) or orig(*a, **k)
    rep2 = evaluate(proto_model, [spec], images=cache, workers=0, progress=False)
    assert calls == [] and headline_metrics(rep2)["colors/zeroshot/top1"] == 1.0  # not embedded again
