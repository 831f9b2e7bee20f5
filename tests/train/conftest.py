"""Trainer test helpers: the tiny model's folder on sys.path (and PYTHONPATH for subprocesses)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@pytest.fixture
def sub_env() -> dict[str, str]:
    """Environment for training subprocesses: finds tiny_model, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["CLIPFORGE_THREADS"] = "1"
    return env


def write_slice(src: Path, dst_dir: Path, n_shards: int, per_shard: int, corrupt: bool = True) -> list[str]:
    """Small shards cut from a real shard (+ one corrupt image in the last) for fast end-to-end tests."""
    import io
    import tarfile

    from clipforge.data.reader import iter_tar_samples

    dst_dir.mkdir(parents=True, exist_ok=True)
    it = iter_tar_samples(str(src))
    paths = []
    for s in range(n_shards):
        path = dst_dir / f"slice-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for _ in range(per_shard):
                sample = next(it)
                for ext in ("jpg", "txt", "json"):
                    data = sample[ext]
                    if corrupt and s == n_shards - 1 and _ == 1 and ext == "jpg":
                        data = b"not a jpeg"
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


@pytest.fixture
def flickr_slice(flickr_test_shard: Path, tmp_path: Path) -> list[str]:
    """4 shards x 24 samples (one corrupt image: 95 usable)."""
    return write_slice(flickr_test_shard, tmp_path / "shards", 4, 24)
