from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.models import load_model

CAPTIONS = ["a dog runs on grass", "two people", "a red car parked near a very old house"]


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_embeddings_equal_transformers(kind, tiny_clip_dir, tiny_siglip_dir):
    from transformers import CLIPModel, SiglipModel

    path = tiny_clip_dir if kind == "clip" else tiny_siglip_dir
    ref = (CLIPModel if kind == "clip" else SiglipModel).from_pretrained(path).eval()
    m = load_model(f"hf:{path}")
    assert m.config.preprocess["size"] == 32
    torch.manual_seed(0)
    px = torch.randn(3, 3, 32, 32)
    tok = m.tokenize(CAPTIONS)
    if kind == "siglip":
        assert tok["input_ids"].shape[1] == 32  # SigLIP pools the last position: fixed-length padding
    with torch.no_grad():
        want_i = F.normalize(_pooled(ref.get_image_features(pixel_values=px)), dim=-1)
        want_t = F.normalize(_pooled(ref.get_text_features(**tok)), dim=-1)
        got_i, got_t = m.encode_image(px), m.encode_text(tok)
    torch.testing.assert_close(got_i, want_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=0)
    assert math.isclose(m.logit_scale.item(), ref.logit_scale.item(), rel_tol=1e-6)
    if kind == "siglip":
        assert m.logit_bias.item() == pytest.approx(-7.5)
    else:
        assert m.logit_bias is None
    # raw ids work too (mask from the pad id)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_text(tok["input_ids"]), got_t, atol=1e-5, rtol=0)


def test_locked_hf_towers_cache_pooled_features(tiny_clip_dir):
    m = load_model(f"hf:{tiny_clip_dir}", unlock_image=0, unlock_text=0)
    assert m.image_locked and m.text_locked
    px = torch.randn(2, 3, 32, 32)
    f = m.image_features(px)
    assert set(f) == {"pooled"} and f["pooled"].shape == (2, 32)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"logit_scale", "hf.visual_projection.weight", "hf.text_projection.weight"}
    free = load_model(f"hf:{tiny_clip_dir}")
    torch.testing.assert_close(m.encode_image(px), free.encode_image(px))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_partly_unlocked_hf_trains_last_layers_only(kind, tiny_clip_dir, tiny_siglip_dir):
    path = tiny_clip_dir if kind == "clip" else tiny_siglip_dir
    m = load_model(f"hf:{path}", unlock_image=1, unlock_text=1)
    assert not m.image_locked and not m.text_locked  # streamed, not cached
    n_layers = m.hf.config.vision_config.num_hidden_layers
    last = f"encoder.layers.{n_layers - 1}."
    for tower in (m.hf.vision_model, m.hf.text_model):
        names = {n for n, p in tower.named_parameters() if p.requires_grad}
        assert names and all(n.startswith(last) or not n.startswith("encoder.") for n in names)
        assert not any(n.startswith("embeddings.") for n in names)
        assert any(n.startswith(last) for n in names)
    # a training step moves only the unlocked weights (+ heads), and the outputs equal the full model's
    free = load_model(f"hf:{path}")
    px, tok = torch.randn(2, 3, 32, 32), m.tokenize(CAPTIONS[:2])
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(px), free.encode_image(px))
    m.train()
    loss = (m.encode_image(px) @ m.encode_text(tok).T).sum()
    loss.backward()
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads and not any(".embeddings." in n or ".encoder.layers.0." in n for n in grads)
    with pytest.raises(ValueError, match="blocks"):
        load_model(f"hf:{path}", unlock_image=99)


def test_partly_unlocked_hf_image_tower(tiny_clip_dir):
    m = load_model(f"towers:hf-image={tiny_clip_dir}+minilm-l6", unlock_image=1)
    assert not m.image_locked
    names = [n for n, p in m.image_tower.named_parameters() if p.requires_grad]
    assert names and all("encoder.layers.0." not in n and "embeddings" not in n for n in names)
