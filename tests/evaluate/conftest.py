"""Fixtures for evaluation tests: tiny models, synthetic shards, an isolated class-embedding cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from evalutils import ColorPrototypeModel, TinyClip, write_color_shards


@pytest.fixture
def tiny_model() -> TinyClip:
    torch.manual_seed(0)
    return TinyClip().eval()


@pytest.fixture
def proto_model() -> ColorPrototypeModel:
    return ColorPrototypeModel().eval()


@pytest.fixture
def color_shards(tmp_path: Path) -> tuple[list[Path], Path]:
    return write_color_shards(tmp_path / "shards", corrupt=1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
