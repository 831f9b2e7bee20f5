"""Helpers for data-layer tests: tiny synthetic images and raw tar shards (imported by the tests)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(w: int = 32, h: int = 24, fmt: str = "JPEG", seed: int = 0, mode: str = "RGB") -> bytes:
    """A small random (but smooth enough to compress) image encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """Write ``[{"__key__": k, ext: bytes}]`` as a plain tar (members in dict order)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for s in samples:
            for ext, data in s.items():
                if ext.startswith("__"):
                    continue
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


def good_sample(key: str, seed: int = 0, caption: str | None = None) -> dict[str, bytes]:
    return {"__key__": key, "jpg": image_bytes(seed=seed), "txt": (caption or f"caption of {key}").encode()}
