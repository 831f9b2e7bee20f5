"""Index test helpers (TinyClip, coloured-square shards) under a unique module name.

Test modules import them as ``from index_testutils import ...``: several test dirs have a conftest.py,
and in one pytest session the module name "conftest" may be another dir's.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipforge.data.transforms import PreprocessConfig
from clipforge.models.base import ClipModel, ModelConfig

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


class HashTokenizer:
    """Words -> stable hashed ids (0 = pad); returns what ClipModel.tokenize promises."""

    pad_token_id = 0

    def __init__(self, vocab: int = 512, length: int = 16) -> None:
        self.vocab, self.length = vocab, length

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, t in enumerate(texts):
            words = t.lower().split()[: self.length] or [""]
            for j, w in enumerate(words):
                ids[i, j] = 1 + zlib.crc32(w.encode()) % (self.vocab - 1)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class TinyClip(ClipModel):
    """32-d embeddings from pooled 4x4 colors and a bag of hashed words: milliseconds per batch."""

    def __init__(self, dim: int = 32) -> None:
        cfg = ModelConfig(
            backend="test",
            spec="test:tiny",
            embed_dim=dim,
            preprocess=PreprocessConfig(size=32).to_dict(),
        )
        super().__init__(cfg)
        g = torch.Generator().manual_seed(0)
        self.tokenizer = HashTokenizer()
        self.img = nn.Linear(48, dim)
        self.words = nn.Embedding(512, dim, padding_idx=0)
        with torch.no_grad():
            self.img.weight.copy_(torch.randn(dim, 48, generator=g) * 0.2)
            self.img.bias.zero_()
            self.words.weight.copy_(torch.randn(512, dim, generator=g))
            self.words.weight[0].zero_()

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.img(F.adaptive_avg_pool2d(feats["pixels"], 4).flatten(1))

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        e = self.words(feats["input_ids"])
        m = feats["attention_mask"].unsqueeze(-1).float()
        return (e * m).sum(1) / m.sum(1).clamp(min=1)


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
