"""``--precision``: bf16 autocast changes text embeddings only slightly, and images stay fp32 on CPU."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from clipforge.data.decode import decode_image
from clipforge.models.encode import embed_pixels, embed_texts, resolve_precision
from clipforge.serve import Client
from clipforge.serve.service import ClipService, ServeConfig

TinyClip = sys.modules["clipforge_index_test_fixtures"].TinyClip  # loaded by tests/serve/conftest.py


class TinyClipProj(TinyClip):
    """TinyClip with a text projection, so that autocast has a matmul to run in bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(super().text_head(feats))


def test_bf16_text_is_close_but_not_identical(server_factory, sample_jpeg):
    model = TinyClipProj().eval()
    texts = ["a red square", "a blue square on a green field", "green"]
    want = embed_texts(model, texts)
    with server_factory(model, None, precision="bf16") as url, Client(url) as c:
        assert c.health()["precision"] == {"text": "bf16", "image": "fp32"}
        got = np.array(c.embed_text(texts))
        img = np.array(c.embed_image(sample_jpeg))
    cos = (got * want).sum(1)
    assert cos.min() > 0.99  # same direction...
    assert np.abs(got - want).max() > 1e-5  # ...but it really ran in bf16
    pixels = model.preprocess(decode_image(sample_jpeg))
    np.testing.assert_allclose(img.reshape(-1), embed_pixels(model, pixels[None])[0], atol=1e-5)


def test_precision_values():
    model = TinyClip()
    assert resolve_precision(model, "fp32") == "fp32"
    assert resolve_precision(model, "bf16") == "bf16"
    assert resolve_precision(model, "auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        ClipService(model, None, ServeConfig(precision="fp8"))
