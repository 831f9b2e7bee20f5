"""Shared fixtures: where the real benchmark shards live (../shared/data beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CLIPFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "flickr8k").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set CLIPFORGE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def flickr_test_shard(shared_data: Path) -> Path:
    return shared_data / "flickr8k" / "test-000000.tar"


@pytest.fixture(scope="session")
def cifar_shard(shared_data: Path) -> Path:
    return shared_data / "cifar10" / "test-000000.tar"
