"""The ImageNet semantic prior of the towers model: what it adds, that it trains, that it round-trips."""

from __future__ import annotations

import torch

from clipforge.data import DecodeConfig, ShardDataset
from clipforge.models import load_model
from clipforge.models.towers import imagenet_class_names


def test_imagenet_class_names_are_the_1000_in_order():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench" and names[207] == "golden retriever" and names[281] == "tabby"


def test_prior_points_dog_images_at_dog_text(flickr_test_shard, tmp_path):
    torch.manual_seed(0)
    m = load_model(
        "towers:efficientnet-lite0+minilm-l6",
        image_head="multiscale",
        semantic_prior="imagenet",
        image_size=160,
    )
    assert torch.allclose(m.prior_text.norm(dim=-1), torch.ones(1000), atol=1e-4)
    # Only the heads and the prior's weight train; the classifier and class-name table stay frozen.
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "prior_scale" in trainable
    assert not any(n.startswith(("image_tower.", "text_tower.")) for n in trainable)

    samples = []
    for s in ShardDataset(str(flickr_test_shard), decode=DecodeConfig()):
        if " dog " in f" {s['caption'].lower()} ":
            samples.append(s)
        if len(samples) == 8:
            break
    px = torch.stack([m.preprocess(s["image"]) for s in samples])
    with torch.no_grad():
        feats = m.image_features(px)
        pooled = m.image_tower.rest(feats)
        probs = torch.softmax(m.image_tower.classifier(pooled[:, -1280:]), -1)
        prior = torch.nn.functional.normalize(probs @ m.prior_text, dim=-1)  # in the text tower's space
        tok = m.tokenize(["a photo of a dog.", "a photo of a car."])
        text = torch.nn.functional.normalize(m.text_tower._full(tok), dim=-1)
    sims = prior @ text.T
    # The classifier names dog breeds for dog photos: the prior is closer to "dog" than to "car".
    assert (sims[:, 0] > sims[:, 1]).float().mean() >= 0.75

    m.save(tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(m.encode_image(px[:2]), m2.encode_image(px[:2]), atol=1e-6)


def test_prior_is_refused_where_it_cannot_work():
    import pytest

    with pytest.raises(ValueError, match="semantic_prior"):
        load_model("towers:efficientnet-lite0+minilm-l6", image_head="attn", semantic_prior="imagenet")
