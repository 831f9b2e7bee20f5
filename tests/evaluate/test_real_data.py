"""Evaluation on the real shards (../shared/data): a tiny model on full shards, real towers on slices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from evalutils import TinyClip, slice_shard

from clipforge.evaluate.embed import embed_images
from clipforge.evaluate.recipes import builtin
from clipforge.evaluate.runner import evaluate, run_probe, run_zeroshot
from clipforge.evaluate.zeroshot import load_classnames


def test_cifar_shard_zeroshot_and_probe(cifar_shard: Path, shared_data: Path) -> None:
    model = TinyClip(size=16).eval()
    imgs = embed_images(model, str(cifar_shard), labels=True, workers=1, batch_size=250, progress=False)
    assert len(imgs) == 1000 and imgs.bad.total == 0
    assert torch.bincount(imgs.labels, minlength=10).min() > 50  # all 10 classes present
    names = load_classnames(shared_data / "cifar10" / "classnames.txt")
    assert names[0] == "airplane" and len(names) == 10
    zs = run_zeroshot(model, imgs, names, "cifar10", cache=False, progress=False)
    assert zs["n_templates"] == 18 and sum(map(sum, zs["confusion"])) == 1000
    pr = run_probe(imgs, 10)
    assert pr["split"]["sizes"][0] + pr["split"]["sizes"][1] + pr["split"]["sizes"][2] == 1000
    # colour statistics alone beat chance on CIFAR-10: the probe really learns from the features
    assert pr["metrics"]["top1"] > 0.15


def test_flickr_test_shard_retrieval(flickr_test_shard: Path, shared_data: Path) -> None:
    spec = builtin("flickr8k", shared_data)
    assert spec.tasks == ("retrieval",) and spec.shards == str(flickr_test_shard)
    rep = evaluate(TinyClip(size=16).eval(), [spec], workers=1, batch_size=250, progress=False)
    (r,) = rep["results"]
    m = r["metrics"]
    assert m["n_images"] == 1000 and m["n_texts"] == 5000  # 5 captions per test image
    assert m["image_to_text_R@1"] <= m["image_to_text_R@5"] <= m["image_to_text_R@10"] <= 1.0
    assert r["shards"]["files"][0]["name"] == "test-000000.tar" and r["shards"]["files"][0]["bytes"] > 0


def test_builtin_recipes_resolve(shared_data: Path) -> None:
    c = builtin("cifar10", shared_data)
    assert c.tasks == ("zeroshot", "probe") and c.templates == "cifar10"
    from clipforge.data.shards import expand_shards

    assert len(expand_shards(c.shards)) == 10
    with pytest.raises(ValueError, match="unknown dataset"):
        builtin("imagenet", shared_data)


@pytest.mark.slow
def test_real_towers_on_slices(shared_data: Path, tmp_path: Path) -> None:
    """The real towers model through the whole API on small slices; batching must not change results."""
    load_model = pytest.importorskip("clipforge.models").load_model
    model = load_model("towers:efficientnet-lite0+minilm-l6")
    cifar = slice_shard(shared_data / "cifar10" / "test-000000.tar", tmp_path / "c.tar", 40)
    flickr = slice_shard(shared_data / "flickr8k" / "test-000000.tar", tmp_path / "f.tar", 24)
    from clipforge.evaluate.recipes import DatasetSpec

    specs = [
        DatasetSpec(
            "cifar-slice",
            str(cifar),
            str(shared_data / "cifar10" / "classnames.txt"),
            "cifar10",
            ("zeroshot",),
        ),
        DatasetSpec("flickr-slice", str(flickr), tasks=("retrieval",)),
    ]
    rep = evaluate(model, specs, image_size=128, batch_size=16, output_dir=tmp_path / "out", progress=False)
    assert [r["task"] for r in rep["results"]] == ["zeroshot", "retrieval"]
    assert rep["results"][0]["n_images"] == 40 and rep["results"][1]["metrics"]["n_texts"] == 120
    assert (tmp_path / "out" / "results.json").exists() and (
        tmp_path / "out" / "confusion_cifar-slice.png"
    ).exists()
    a = embed_images(model, str(flickr), image_size=128, batch_size=24, workers=0, progress=False)
    b = embed_images(model, str(flickr), image_size=128, batch_size=5, workers=0, progress=False)
    assert a.keys == b.keys and torch.allclose(a.emb, b.emb, atol=1e-4)
