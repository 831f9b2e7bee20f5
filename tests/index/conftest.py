"""Index test fixtures: a tiny deterministic ClipModel and small synthetic shards (fast on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
from index_testutils import COLORS, HashTokenizer, TinyClip, _jpeg, write_shard  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_model() -> TinyClip:
    return TinyClip().eval()


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    write_shard(d / "a-000000.tar", 30, prefix="a", corrupt=(7,))
    write_shard(d / "b-000001.tar", 30, prefix="b", start=30)
    return d


@pytest.fixture
def tiny_spec(monkeypatch, tiny_model):
    """Resolve the spec 'tiny' to the tiny test model wherever the index code loads models."""
    import clipforge.index.build as build_mod

    real = build_mod.load_model_spec

    def fake(spec, **kw):
        return tiny_model if spec in ("tiny", "test:tiny") else real(spec, **kw)

    monkeypatch.setattr(build_mod, "load_model_spec", fake)
    return "tiny"
