"""openclip:DIR equals open_clip itself (1e-5) on the committed fixtures of benchmarks/openclip_parity.py.

The ViT families; the CoCa ones (coca-*) are checked in test_openclip_coca.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "data" / "openclip_parity"
FAMILIES = sorted(p.name for p in FIXTURES.glob("vit-*") if (p / "reference.safetensors").is_file())


def test_every_family_is_there():
    assert FAMILIES == ["vit-eos-pool", "vit-gelu", "vit-logit-bias", "vit-quickgelu"]


@pytest.mark.parametrize("family", FAMILIES)
def test_openclip_dir_equals_open_clip(family):
    from clipforge.models.openclip import build, build_config
    from clipforge.models.tokenizer import Tokenizer

    d = FIXTURES / family
    ref = load_file(str(d / "reference.safetensors"))
    config = build_config(f"openclip:{d}")
    model = build(config, tokenizer=Tokenizer.minilm(context_length=config.context_length)).eval()
    ids = ref["input_ids"]  # token ids, not text: the fixtures fix the EOT positions
    with torch.no_grad():
        a = model.encode_image(ref["pixels"], normalize=False)
        b = model.encode_text({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, normalize=False)
    assert (a - ref["image"]).abs().max() < 1e-5
    assert (b - ref["text"]).abs().max() < 1e-5
    assert torch.allclose(model.logit_scale.detach(), ref["logit_scale"][0])
    if "logit_bias" in ref:
        assert torch.allclose(model.logit_bias.detach(), ref["logit_bias"][0])


def _train_two_steps(model, pixels, ids) -> None:
    import torch.nn.functional as F

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for _ in range(2):
        img, txt, scale, _bias = model(pixels, tokens)
        logits = scale * img @ txt.t()
        target = torch.arange(len(ids))
        loss = F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_open_clip_checkpoint_round_trip(tmp_path):
    """An open_clip checkpoint: load, train 2 steps, export (openclip and hf), load back: equal outputs."""
    from transformers import AutoModel

    from clipforge.export import export_model
    from clipforge.models.openclip import build, build_config
    from clipforge.models.tokenizer import Tokenizer

    d = FIXTURES / "vit-gelu"
    ref = load_file(str(d / "reference.safetensors"))
    config = build_config(f"openclip:{d}")
    tok = Tokenizer.minilm(context_length=config.context_length)
    model = build(config, tokenizer=tok)
    px, ids = ref["pixels"], ref["input_ids"]
    _train_two_steps(model, px, ids)
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        a, b = model.encode_image(px, normalize=False), model.encode_text(tokens, normalize=False)
    assert (a - ref["image"]).abs().max() > 1e-4  # it did train
    export_model(model, "openclip", tmp_path / "oc")
    back = build(build_config(f"openclip:{tmp_path / 'oc'}"), tokenizer=tok).eval()
    export_model(model, "hf", tmp_path / "hf")
    hf = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert (back.encode_image(px, normalize=False) - a).abs().max() < 1e-6
        assert (back.encode_text(tokens, normalize=False) - b).abs().max() < 1e-6
        out = hf.get_image_features(pixel_values=px)
        assert (getattr(out, "pooler_output", out) - a).abs().max() < 1e-5
        out = hf.get_text_features(**tokens)
        assert (getattr(out, "pooler_output", out) - b).abs().max() < 1e-5
