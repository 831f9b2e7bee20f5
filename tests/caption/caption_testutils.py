"""A tiny, deterministic CLIP for caption tests (``py:caption_testutils:tiny_clip``), and shard slices."""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

import torch
from torch import nn

from clipforge.models.base import ClipModel, ModelConfig


class HashTokenizer:
    """Words -> ids by crc32 (stable across processes), padded to the batch's longest caption."""

    pad_token_id = 0

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [[1 + zlib.crc32(w.lower().encode()) % 511 for w in t.split()][:16] for t in texts]
        ids = [i or [1] for i in ids]
        out = torch.zeros(len(ids), max(len(i) for i in ids), dtype=torch.long)
        for r, i in enumerate(ids):
            out[r, : len(i)] = torch.tensor(i)
        return {"input_ids": out, "attention_mask": (out != 0).long()}


class TinyCaptionClip(ClipModel):
    """Locked towers: image features are 4x4 average colours (48 values), text a frozen bag of words."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        g = torch.Generator().manual_seed(0)
        self.tokenizer = HashTokenizer()
        self.tok = nn.Embedding(512, 16)
        self.tok.weight.data = torch.randn(512, 16, generator=g)
        self.tok.weight.requires_grad_(False)
        self.img_proj = nn.Linear(48, 16)
        self.txt_proj = nn.Linear(16, 16)
        for lin in (self.img_proj, self.txt_proj):
            lin.weight.data = torch.randn(lin.weight.shape, generator=g) * 0.2
            lin.bias.data.zero_()

    @property
    def image_locked(self) -> bool:
        return True

    @property
    def text_locked(self) -> bool:
        return True

    def image_features(self, pixels):
        return {"pooled": nn.functional.adaptive_avg_pool2d(pixels, 4).flatten(1)}

    def image_head(self, feats):
        return self.img_proj(feats["pooled"])

    def text_features(self, tokens):
        m = tokens["attention_mask"].unsqueeze(-1).float()
        return {"pooled": (self.tok(tokens["input_ids"]) * m).sum(1) / m.sum(1).clamp(min=1)}

    def text_head(self, feats):
        return self.txt_proj(feats["pooled"])


def tiny_clip() -> TinyCaptionClip:
    cfg = ModelConfig(
        backend="py", spec="py:caption_testutils:tiny_clip", embed_dim=16, preprocess={"size": 32}
    )
    return TinyCaptionClip(cfg).eval()


def slice_shard(src: Path, dst: Path, n: int, corrupt: str | None = None) -> Path:
    """The first ``n`` samples of a shard; ``corrupt``: a key added with undecodable JPEG bytes."""
    keys: list[str] = []
    with tarfile.open(src) as t, tarfile.open(dst, "w") as o:
        for m in t:
            k = m.name.split(".")[0]
            if k not in keys:
                if len(keys) == n:
                    break
                keys.append(k)
            o.addfile(m, t.extractfile(m))
        if corrupt:
            import io

            for ext, data in (("jpg", b"not a jpeg"), ("txt", b"a broken sample")):
                info = tarfile.TarInfo(f"{corrupt}.{ext}")
                info.size = len(data)
                o.addfile(info, io.BytesIO(data))
    return dst
