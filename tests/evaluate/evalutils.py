"""Test helpers for evaluation: tiny ClipModels and synthetic colour shards (no real towers needed)."""

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

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}


class WordTokenizer:
    """Whitespace word tokenizer with hashed ids; pads to the longest text in the batch."""

    pad_token_id = 0

    def __init__(self, vocab: int = 97, fixed: dict[str, int] | None = None) -> None:
        self.vocab = vocab
        self.fixed = fixed or {}

    def word_id(self, w: str) -> int:
        w = w.strip(".,!?").lower()
        return self.fixed.get(
            w, zlib.crc32(w.encode()) % (self.vocab - 1 - len(self.fixed)) + 1 + len(self.fixed)
        )

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [[self.word_id(w) for w in t.split()] or [self.vocab - 1] for t in texts]
        n = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), n, dtype=torch.long)
        mask = torch.zeros(len(ids), n, dtype=torch.long)
        for r, i in enumerate(ids):
            input_ids[r, : len(i)] = torch.tensor(i)
            mask[r, : len(i)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


class TinyClip(ClipModel):
    """Random but deterministic: 2x2-pooled pixels -> linear; mean word embedding -> linear."""

    def __init__(self, dim: int = 16, size: int = 16, seed: int = 0) -> None:
        cfg = ModelConfig(
            backend="scratch",
            spec="test:tiny",
            embed_dim=dim,
            preprocess=PreprocessConfig(size=size).to_dict(),
        )
        super().__init__(cfg)
        g = torch.Generator().manual_seed(seed)
        self.img = nn.Linear(12, dim)
        self.emb = nn.Embedding(97, dim)
        self.txt = nn.Linear(dim, dim)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5
        self.tokenizer = WordTokenizer()
        self.text_calls = 0

    def image_features(self, pixels):
        return {"x": F.adaptive_avg_pool2d(pixels, 2).flatten(1)}

    def image_head(self, feats):
        return self.img(feats["x"])

    def text_features(self, tokens):
        self.text_calls += 1
        m = tokens["attention_mask"].unsqueeze(-1).float()
        return {"x": (self.emb(tokens["input_ids"]) * m).sum(1) / m.sum(1).clamp(min=1)}

    def text_head(self, feats):
        return self.txt(feats["x"])


class ColorPrototypeModel(ClipModel):
    """Image embedding = mean of each colour channel; the words red/green/blue embed to e_0/e_1/e_2.

    So the class embedding of "red" under any template is exactly the prototype e_0, and a red
    image's closest prototype is e_0: zero-shot must reach 100%.
    """

    def __init__(self) -> None:
        cfg = ModelConfig(
            backend="scratch",
            spec="test:prototype",
            embed_dim=3,
            preprocess=PreprocessConfig(size=8).to_dict(),
        )
        super().__init__(cfg)
        self.tokenizer = WordTokenizer(fixed={"red": 1, "green": 2, "blue": 3})
        table = torch.zeros(97, 3)
        table[1, 0] = table[2, 1] = table[3, 2] = 1.0
        self.table = nn.Parameter(table)

    def image_features(self, pixels):
        return {"x": pixels.mean((2, 3))}

    def image_head(self, feats):
        return feats["x"]

    def text_features(self, tokens):
        m = tokens["attention_mask"].unsqueeze(-1).float()
        return {"x": (self.table[tokens["input_ids"]] * m).sum(1)}

    def text_head(self, feats):
        return feats["x"]


def _png(rgb: tuple[int, int, int], rng: np.random.Generator, size: int = 12) -> bytes:
    arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-25, 26, (size, size, 3)), 0, 255).astype(
        np.uint8
    )
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1700000000
    tf.addfile(info, io.BytesIO(data))


def write_color_shards(
    root: Path, n_shards: int = 2, per_shard: int = 18, corrupt: int = 0, seed: int = 0
) -> tuple[list[Path], Path]:
    """Shards of noisy red/green/blue squares with .cls, .json (label + 2 captions), .txt.

    ``corrupt`` samples per shard get undecodable image bytes. Returns (shards, classnames file).
    """
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    paths = []
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        p = root / f"color-{s:06d}.tar"
        with tarfile.open(p, "w") as tf:
            for i in range(per_shard):
                key = f"{s:02d}{i:04d}"
                c = int(rng.integers(0, 3))
                img = b"not an image" if i < corrupt else _png(COLORS[names[c]], rng)
                caps = [f"a {names[c]} square number {i}", f"picture {s} {i} {names[c]}"]
                _add(tf, f"{key}.png", img)
                _add(tf, f"{key}.cls", str(c).encode())
                _add(tf, f"{key}.json", json.dumps({"label": c, "captions": caps}).encode())
                _add(tf, f"{key}.txt", caps[0].encode())
        paths.append(p)
    cn = root / "classnames.txt"
    cn.write_text("\n".join(names) + "\n")
    return paths, cn


def slice_shard(src: Path, dst: Path, n: int) -> Path:
    """Copy the first ``n`` samples of a real shard into a small temporary shard (tests only)."""
    from clipforge.data.reader import iter_tar_samples

    with tarfile.open(dst, "w") as tf:
        for i, s in enumerate(iter_tar_samples(str(src))):
            if i >= n:
                break
            for ext, data in s.items():
                if not ext.startswith("__"):
                    _add(tf, f"{s['__key__']}.{ext}", data)
    return dst
