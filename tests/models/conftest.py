"""Tiny HF CLIP / SigLIP checkpoints saved offline (random weights, MiniLM's WordPiece tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from clipforge.models.tokenizer import minilm_dir

TEXT = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,
}
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def _save_tokenizer(d: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir() / name, d / name)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={**TEXT, "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102},
        vision_config=VISION,
        projection_dim=16,
    )
    d = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(cfg).eval().save_pretrained(d)
    _save_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(text_config={**TEXT, "pad_token_id": 0}, vision_config=VISION)
    d = tmp_path_factory.mktemp("tiny_siglip")
    model = SiglipModel(cfg).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)
        model.logit_scale.fill_(1.7)
    model.save_pretrained(d)
    _save_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def towers_model():
    """The real pretrained towers (loaded once per session: ~3 s)."""
    from clipforge.models import load_model

    torch.manual_seed(0)
    return load_model("towers:efficientnet-lite0+minilm-l6", embed_dim=64)
