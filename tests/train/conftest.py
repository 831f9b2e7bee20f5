"""Trainer test helpers: the tiny model's folder on sys.path (and PYTHONPATH for subprocesses)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_testutils import write_slice  # noqa: E402


@pytest.fixture
def sub_env() -> dict[str, str]:
    """Environment for training subprocesses: finds tiny_model, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["CLIPFORGE_THREADS"] = "1"
    return env


@pytest.fixture
def flickr_slice(flickr_test_shard: Path, tmp_path: Path) -> list[str]:
    """4 shards x 24 samples (one corrupt image: 95 usable)."""
    return write_slice(flickr_test_shard, tmp_path / "shards", 4, 24)
