"""Export fixtures: a tiny random HF CLIP dir (MiniLM's WordPiece) and the scratch / towers models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from clipforge.models.tokenizer import minilm_dir


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = CLIPConfig(
        text_config={
            **small,
            "vocab_size": 30522,
            "max_position_embeddings": 32,
            "pad_token_id": 0,
            "bos_token_id": 101,
            "eos_token_id": 102,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    d = tmp_path_factory.mktemp("tiny_hf_clip")
    CLIPModel(cfg).eval().save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_dir() / name, d / name)
    return d


@pytest.fixture(scope="session")
def nano():
    from clipforge.models import load_model

    return load_model("scratch:vit-nano")


@pytest.fixture(scope="session")
def towers():
    """The real pretrained towers (efficientnet-lite0 + MiniLM from their PyPI packages)."""
    from clipforge.models import load_model

    return load_model("towers:efficientnet-lite0+minilm-l6", embed_dim=64, image_size=128)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return ["a dog", "two children playing football on a sunny beach near the sea at dusk", "red car", "x"]


@pytest.fixture(scope="session")
def pixels():
    """pixels(model, n, seed): a random batch at the model's input size."""

    def make(model, n: int, seed: int = 1) -> torch.Tensor:
        s = int(model.config.preprocess["size"])
        return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))

    return make
