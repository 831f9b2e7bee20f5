from __future__ import annotations

import pytest
import torch

from clipforge.models import list_models, load_model


def test_scratch_nano_trains_end_to_end():
    torch.manual_seed(0)
    m = load_model("scratch:vit-nano")
    assert m.tokenizer.vocab_size == 30522 and m.config.preprocess["size"] == 64
    assert not m.image_locked and not m.text_locked
    px = torch.randn(4, 3, 64, 64)
    tok = m.tokenize(["a dog", "a cat on a mat", "people", "a long caption about a red bus"])
    feats = m.image_features(px)
    assert set(feats) == {"pixels"}  # nothing frozen: the whole tower is the head
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        img, txt, scale, _ = m(px, tok)
        logits = scale * img @ txt.T
        labels = torch.arange(4)
        loss = (
            torch.nn.functional.cross_entropy(logits, labels)
            + torch.nn.functional.cross_entropy(logits.T, labels)
        ) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


def test_scratch_siglip_option_and_names():
    m = load_model("scratch:vit-nano", loss="siglip", embed_dim=24)
    assert m.logit_bias.item() == -10.0
    assert abs(m.logit_scale.exp().item() - 10.0) < 1e-4
    assert m.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 24)
    assert "scratch:vit-b-32" in list_models()
    with pytest.raises(ValueError, match="unknown scratch model"):
        load_model("scratch:vit-huge-9000")
