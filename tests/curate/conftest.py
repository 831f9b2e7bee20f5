"""Fixtures for curation tests: tiny model, synthetic shards with planted faults."""

from __future__ import annotations

import pytest
from curate_testutils import TinyClip, make_shards


@pytest.fixture(scope="session")
def tiny_model() -> TinyClip:
    return TinyClip().eval()


@pytest.fixture()
def shards(tmp_path):
    return make_shards(tmp_path)
