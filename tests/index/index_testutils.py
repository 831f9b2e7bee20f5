"""Index test helpers (the shared fake CLIP as index/serve use it, coloured-square shards).

A unique module name: test modules import them as ``from index_testutils import ...``; several test dirs
have a conftest.py, and in one pytest session the module name "conftest" may be another dir's.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn

from clipforge.data.transforms import PreprocessConfig

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # tests/ holds the shared fake (a py: spec subprocess may have only this dir)
    sys.path.append(_TESTS)

import fake_clip  # noqa: E402
from fake_clip import tiny_config  # noqa: E402

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


class HashTokenizer(fake_clip.HashTokenizer):
    """Every text padded to ``length`` ids; a text without words gets id 1 (never an all-padding row)."""

    def __init__(self, vocab: int = 512, length: int = 16) -> None:
        super().__init__(vocab, max_len=length, length=length, empty_id=1)


class TinyClip(fake_clip.TinyClip):
    """32-d embeddings from pooled 4x4 colors and a bag of hashed words: milliseconds per batch."""

    def __init__(self, dim: int = 32) -> None:
        cfg = tiny_config(dim, 32, preprocess=PreprocessConfig(size=32).to_dict())
        super().__init__(
            cfg,
            text_proj=False,
            emb_scale=1.0,
            zero_bias=True,
            order=("img", "emb"),
            tokenizer=HashTokenizer(),
        )

    @property
    def words(self) -> nn.Embedding:
        """The word table (the text embedding is its masked mean, no projection)."""
        return self.emb


def _jpeg(color: tuple[int, int, int], seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shard(
    path: Path, n: int, prefix: str = "s", corrupt: tuple[int, ...] = (), start: int = 0
) -> list[str]:
    """A webdataset shard of colored squares: KEY.jpg/.txt/.json (label = color index). Returns keys."""
    names = list(COLORS)
    keys = []
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            key = f"{prefix}{i:04d}"
            name = names[i % 3]
            files = {
                "jpg": b"not a jpeg" if i in corrupt else _jpeg(COLORS[name], i),
                "txt": f"a {name} square number {i}".encode(),
                "json": json.dumps({"label": i % 3, "classname": name, "n": i}).encode(),
            }
            for ext, data in files.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            if i not in corrupt:
                keys.append(key)
    return keys
