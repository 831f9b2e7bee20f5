"""Zero-shot: prototype model reaches 100%, template loading, class-embedding cache, metrics, PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.evaluate.embed import embed_images
from clipforge.evaluate.runner import run_zeroshot
from clipforge.evaluate.zeroshot import (
    available_templates,
    class_embeddings,
    load_classnames,
    load_templates,
    zeroshot_metrics,
)


def test_shipped_templates() -> None:
    assert {"imagenet80", "cifar10", "simple"} <= set(available_templates())
    name, t = load_templates("imagenet80")
    assert name == "imagenet80" and len(t) == 80 and len(set(t)) == 80
    assert len(load_templates("cifar10")[1]) == 18
    assert all("{}" in x for x in t)


def test_template_files_and_errors(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("a {} here\n\nthe {}\n")
    assert load_templates(str(tmp_path / "t.txt"))[1] == ["a {} here", "the {}"]
    (tmp_path / "bad.json").write_text(json.dumps(["no placeholder"]))
    with pytest.raises(ValueError, match="placeholder"):
        load_templates(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="unknown template set"):
        load_templates("nope")


def test_prototype_model_reaches_100(proto_model, color_shards, tmp_path: Path) -> None:
    shards, cn = color_shards
    imgs = embed_images(proto_model, [str(s) for s in shards], labels=True, workers=0, progress=False)
    assert imgs.bad.counts["corrupt_image"] == 2  # one per shard: counted, not lost
    classnames = load_classnames(cn)
    r = run_zeroshot(
        proto_model, imgs, classnames, "imagenet80", confusion_png=tmp_path / "c.png", progress=False
    )
    assert r["metrics"]["top1"] == 1.0 and r["metrics"]["mean_per_class_recall"] == 1.0
    conf = np.array(r["confusion"])
    assert conf.trace() == conf.sum() == len(imgs)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    # with swapped class names every prediction is wrong
    r2 = run_zeroshot(proto_model, imgs, ["green", "blue", "red"], "simple", cache=False, progress=False)
    assert r2["metrics"]["top1"] == 0.0


def test_ensembling_and_cache(tiny_model) -> None:
    names = ["cat", "dog"]
    templates = ["a photo of a {}.", "a drawing of the {}"]
    e = class_embeddings(tiny_model, names, templates, progress=False)
    single = [tiny_model.encode_text(tiny_model.tokenize([t.format(n) for t in templates])) for n in names]
    want = torch.nn.functional.normalize(torch.stack([s.mean(0) for s in single]), dim=-1)
    assert torch.allclose(e, want, atol=1e-5)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    calls = tiny_model.text_calls
    e2 = class_embeddings(tiny_model, names, templates, progress=False)  # from the disk cache
    assert tiny_model.text_calls == calls and torch.equal(e, e2)
    class_embeddings(tiny_model, names, templates[:1], progress=False)  # other templates: recomputed
    assert tiny_model.text_calls > calls
    with torch.no_grad():
        tiny_model.txt.bias.add_(1.0)  # other weights: recomputed, different
    e3 = class_embeddings(tiny_model, names, templates, progress=False)
    assert not torch.allclose(e, e3)


def test_descriptions_join_the_average(tiny_model, tmp_path: Path) -> None:
    from clipforge.evaluate.zeroshot import load_descriptions

    p = tmp_path / "d.json"
    p.write_text(json.dumps({"cat": ["small furry pet"], "dog": ["loyal barking pet", "a puppy"]}))
    d = load_descriptions(p, ["cat", "dog"])
    a = class_embeddings(tiny_model, ["cat", "dog"], ["a {}"], d, cache=False, progress=False)
    b = class_embeddings(tiny_model, ["cat", "dog"], ["a {}"], cache=False, progress=False)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="no sentences"):
        load_descriptions(p, ["cat", "bird"])


def test_metrics_by_hand() -> None:
    cls = torch.eye(3)
    img = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0.2, 1.0]])
    labels = torch.tensor([0, 1, 1, 2])
    m, conf = zeroshot_metrics(img, cls, labels)
    assert m["top1"] == 0.75
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["top5"] == 1.0  # top-min(5, C) = top-3 always hits with 3 classes
    assert conf.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="labels outside"):
        zeroshot_metrics(img, cls, torch.tensor([0, 1, 2, 3]))
