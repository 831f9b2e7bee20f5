"""Helpers for curation tests: the shared fake CLIP (tests/fake_clip.py) as curation uses it; synthetic
shards."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # tests/ holds the shared fake (a py: spec subprocess may have only this dir)
    sys.path.append(_TESTS)

import fake_clip  # noqa: E402
from fake_clip import tiny_config  # noqa: E402


class HashTokenizer(fake_clip.HashTokenizer):
    """Every text padded to ``length`` ids, ``vocab`` 997: what the curation tests were written with."""

    def __init__(self, vocab: int = 997, length: int = 16) -> None:
        super().__init__(vocab, max_len=length, length=length)


class TinyClip(fake_clip.TinyClip):
    """Image: 4x4 average-pooled pixels -> linear; text: mean of word embeddings -> linear (in the heads)."""

    def __init__(self, dim: int = 16, size: int = 32) -> None:
        pre = {"size": size, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
        super().__init__(
            tiny_config(dim, size, preprocess=pre), vocab=997, width=24, tokenizer=HashTokenizer()
        )


def image_bytes(seed: int, size: int = 40, fmt: str = "JPEG", color: tuple | None = None) -> bytes:
    """A smooth random image (so pHash is meaningful), or a solid color when ``color`` is given."""
    if color is not None:
        arr = np.zeros((size, size, 3), np.uint8) + np.array(color, np.uint8)
    else:
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def reencode(data: bytes, size: int, quality: int = 80) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """samples: {"key", "jpg": bytes | None, "txt": str | None}; writes KEY.jpg/KEY.txt/KEY.json."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for s in samples:
            members = {}
            if s.get("jpg") is not None:
                members["jpg"] = s["jpg"]
            if s.get("txt") is not None:
                members["txt"] = s["txt"].encode()
            members["json"] = json.dumps({"id": s["key"]}).encode()
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{s['key']}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path


CAPTIONS = [
    "a black dog runs on the grass",
    "two children play in the water at the beach",
    "a man rides a bike down the street",
    "a woman in a red shirt climbs a rock",
    "a brown horse stands in a field",
    "people walk past a building in the city",
]


def make_shards(tmp: Path, n_shards: int = 2, per_shard: int = 10) -> list[Path]:
    """Shards with a known exact duplicate, a near duplicate, a blank image and a corrupt image."""
    paths = []
    first = image_bytes(0)
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            k = s * per_shard + i
            samples.append(
                {"key": f"s{s}_{i:03d}", "jpg": image_bytes(k), "txt": CAPTIONS[k % len(CAPTIONS)]}
            )
        if s == 0:
            samples[1]["jpg"] = first  # exact duplicate of s0_000
            samples[2]["jpg"] = reencode(first, 48)  # near duplicate of s0_000
            samples[3]["jpg"] = image_bytes(0, color=(200, 200, 200))  # blank
            samples[4]["jpg"] = b"not an image at all"  # corrupt
            samples[5]["txt"] = "buy buy buy buy now http://spam.example.com <b>deal</b>"
        paths.append(write_shard(tmp / f"part-{s:06d}.tar", samples))
    return paths
