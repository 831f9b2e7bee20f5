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


# scratch:vit-nano and its onnx export, shared by the index and serve --runtime onnx tests
@pytest.fixture(scope="session")
def nano():
    from clipforge.models import load_model

    return load_model("scratch:vit-nano").eval()


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(scope="session")
def nano_onnx(nano, onnx_cache):
    from clipforge.export.runtime import load_runtime

    return load_runtime(nano, "onnx", threads=1, cache=onnx_cache)

