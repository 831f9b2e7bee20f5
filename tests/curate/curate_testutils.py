"""Helpers for curation tests: a tiny deterministic ClipModel and synthetic shards."""

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

from clipforge.models.base import ClipModel, ModelConfig


class HashTokenizer:
    """Words -> ids by crc32 (stable across processes), padded; the ClipModel tokenizer contract."""

    pad_token_id = 0

    def __init__(self, vocab: int = 997, length: int = 16) -> None:
        self.vocab, self.length = vocab, length

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [1 + zlib.crc32(w.lower().encode()) % (self.vocab - 1) for w in t.split()][: self.length]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class TinyClip(ClipModel):
    """Image: 4x4 average-pooled pixels -> linear; text: mean of word embeddings -> linear."""

    def __init__(self, dim: int = 16, size: int = 32) -> None:
        pre = {"size": size, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
        cfg = ModelConfig(backend="test", spec="test:tiny", embed_dim=dim, preprocess=pre)
        super().__init__(cfg)
        g = torch.Generator().manual_seed(0)
        self.img = nn.Linear(48, dim)
        self.emb = nn.Embedding(997, 24)
        self.txt = nn.Linear(24, dim)
        for p in self.parameters():
            if p.dim() > 0:
                p.data = torch.randn(p.shape, generator=g) * 0.2
        self.tokenizer = HashTokenizer()

    def image_head(self, feats):
        return self.img(F.adaptive_avg_pool2d(feats["pixels"], 4).flatten(1))

    def text_head(self, feats):
        m = feats["attention_mask"].unsqueeze(-1).float()
        e = (self.emb(feats["input_ids"]) * m).sum(1) / m.sum(1).clamp(min=1)
        return self.txt(e)


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
