"""Trainer test helpers under a unique module name (``from train_testutils import write_slice``):
several test dirs have a conftest.py, and in one pytest session "conftest" may be another dir's."""

from __future__ import annotations

from pathlib import Path


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
