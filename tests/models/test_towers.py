from __future__ import annotations

import pytest
import torch

from clipforge.models import load_model
from clipforge.models.tokenizer import minilm_dir
from clipforge.models.tower_text import HFTextTower

CAPTIONS = ["A black dog is running through the grass .", "Two children play on a beach", "a red car"]


def test_minilm_tower_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    ref_model = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    ref = torch.as_tensor(ref_model.encode(CAPTIONS, convert_to_numpy=True))
    from clipforge.models.tokenizer import Tokenizer

    tower = HFTextTower(minilm_dir(), unlock=0)
    tok = Tokenizer.minilm(context_length=128)
    got = tower.rest(tower.prefix(tok(CAPTIONS)))
    torch.testing.assert_close(
        torch.nn.functional.normalize(got, dim=-1),
        torch.nn.functional.normalize(ref, dim=-1),
        atol=1e-5,
        rtol=1e-4,
    )


def test_locked_towers_features_are_compact_and_heads_train(towers_model):
    m = towers_model
    assert m.image_locked and m.text_locked
    px = torch.randn(2, 3, 96, 96)
    tok = m.tokenize(CAPTIONS[:2])
    fi, ft = m.image_features(px), m.text_features(tok)
    assert set(fi) == {"pooled"} and fi["pooled"].shape == (2, 1280) and not fi["pooled"].requires_grad
    assert set(ft) == {"pooled"} and ft["pooled"].shape == (2, 384)
    m.train()
    img, txt, scale, bias = m(px, tok)
    (img @ txt.T * scale).sum().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"logit_scale", "image_proj.weight", "text_proj.weight"}
    assert m.image_proj.weight.grad is not None and m.text_proj.weight.grad.abs().sum() > 0
    assert bias is None
    m.eval()
    m.zero_grad(set_to_none=True)
    # head(features) == encode: the split is exactly the forward
    torch.testing.assert_close(m.encode_image(px), torch.nn.functional.normalize(m.image_head(fi), dim=-1))


@pytest.mark.parametrize("image_head", ["mlp", "attn", "multiscale"])
def test_partly_unlocked_split_equals_full_forward(image_head):
    torch.manual_seed(0)
    m = load_model(
        "towers:efficientnet-lite0+minilm-l6",
        embed_dim=32,
        image_head=image_head,
        text_head="mlp",
        unlock_image=2,
        unlock_text=1,
        loss="siglip",
    )
    assert not m.image_locked and not m.text_locked
    assert m.logit_bias is not None and m.logit_bias.item() == -10.0
    px = torch.randn(2, 3, 64, 64)
    tok = m.tokenize(CAPTIONS[:2])
    fi, ft = m.image_features(px), m.text_features(tok)
    assert "map" in fi and ft["hidden"].shape[:2] == tok["input_ids"].shape
    # reference: the whole tower, unsplit
    net = m.image_tower.net
    with torch.no_grad():
        x = net.stem(px)
        for u in net.units[:15]:
            x = u(x)
    torch.testing.assert_close(fi["map"], x, atol=2e-4, rtol=1e-3)
    m.train()
    emb = m.image_head(fi)
    emb.sum().backward()
    last_block = m.image_tower.net._blocks[15]._project_conv.weight
    assert last_block.requires_grad and last_block.grad is not None
    assert not m.image_tower.net._blocks[14]._project_conv.weight.requires_grad
    assert not m.image_tower.net._blocks[15]._bn2.training  # freeze_bn keeps BN stats fixed
    txt = m.text_head(ft)
    txt.sum().backward()
    assert m.text_tower.layers[5].attention.self.query.weight.grad is not None
    assert not m.text_tower.layers[4].attention.self.query.weight.requires_grad
    m.eval()
    full = m.text_tower.model(**tok).last_hidden_state
    from clipforge.models.tower_text import mean_pool

    torch.testing.assert_close(
        m.text_tower.rest(ft), mean_pool(full, tok["attention_mask"]), atol=1e-5, rtol=1e-4
    )


def test_bad_specs_give_clear_errors():
    with pytest.raises(ValueError, match="IMAGE\\+TEXT"):
        load_model("towers:efficientnet-lite0")
    with pytest.raises(ValueError, match="unknown image tower"):
        load_model("towers:resnet50+minilm-l6")
    with pytest.raises(ValueError, match="unknown model spec"):
        load_model("nope:thing")
