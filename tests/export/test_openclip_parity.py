"""openclip:DIR equals open_clip itself (1e-5) on the committed fixtures of benchmarks/openclip_parity.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "data" / "openclip_parity"
FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())


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
