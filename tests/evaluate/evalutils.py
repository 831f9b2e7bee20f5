"""Test helpers for evaluation: the shared fake CLIP (tests/fake_clip.py) as eval uses it, a colour-prototype
model, synthetic colour shards (no real towers needed)."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from clipforge.data.transforms import PreprocessConfig
from clipforge.models.base import ClipModel, ModelConfig

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:  # tests/ holds the shared fake (a py: spec subprocess may have only this dir)
    sys.path.append(_TESTS)

import fake_clip  # noqa: E402
from fake_clip import tiny_config  # noqa: E402

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}


class WordTokenizer(fake_clip.HashTokenizer):
    """Whitespace words, punctuation stripped, hashed ids; pads to the batch's longest text (no cut)."""

    def __init__(self, vocab: int = 97, fixed: dict[str, int] | None = None) -> None:
        super().__init__(vocab, max_len=None, empty_id=vocab - 1, strip=".,!?", fixed=fixed)


class TinyClip(fake_clip.TinyClip):
    """Random but deterministic: 2x2-pooled pixels -> linear; mean word embedding -> linear.

    The pooling and the word bag are the frozen features (``split="features"``), as the eval caches see them.
    """

    def __init__(self, dim: int = 16, size: int = 16, seed: int = 0) -> None:
        cfg = tiny_config(dim, size, backend="scratch", preprocess=PreprocessConfig(size=size).to_dict())
        super().__init__(
            cfg, grid=2, vocab=97, split="features", scale=0.5, order=("logit_scale", "img", "emb", "txt"),
            seed=seed, tokenizer=WordTokenizer(),
        )  # fmt: skip


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
