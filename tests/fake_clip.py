"""The one fake CLIP for tests: deterministic, milliseconds per batch, no downloads.

Image: pixels average-pooled to a ``grid`` x ``grid`` colour map -> linear. Text: crc32-hashed words ->
embedding bag (masked mean) -> linear (or the bag itself). It keeps the ClipModel split: with
``split="head"`` the ``*_features`` pass pixels/tokens through and everything runs in ``*_head``; with
``"features"`` the pooling and the bag run in ``*_features`` (the frozen prefix a cache stores);
``"locked"`` also freezes the word table and reports both towers locked.

The area helpers (tests/<area>/*_testutils.py, evalutils.py, tiny_model.py) subclass it with the knobs
their tests were written against, so each keeps its weights and embeddings bit for bit. Import it as
``from fake_clip import ...``: pytest puts tests/ on sys.path (tests/conftest.py), and each helper adds
it too, for subprocesses that import a helper through a ``py:`` spec.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.base import ClipModel, ModelConfig


class HashTokenizer:
    """Words -> ``1 + crc32(word) % (vocab - 1)``: stable across processes, 0 is padding.

    ``max_len`` cuts each text (None: keep every word); ``length`` pads every batch to that many ids
    (None: to the batch's longest text); ``empty_id`` is what a text without words gets (None: an
    all-padding row); ``strip``: punctuation cut from each word; ``fixed``: words with reserved ids
    (hashed words then land above them).
    """

    pad_token_id = 0

    def __init__(
        self,
        vocab: int = 512,
        max_len: int | None = 16,
        length: int | None = None,
        empty_id: int | None = None,
        strip: str = "",
        fixed: dict[str, int] | None = None,
    ) -> None:
        self.vocab, self.max_len, self.length, self.empty_id = vocab, max_len, length, empty_id
        self.strip, self.fixed = strip, fixed or {}

    def word_id(self, w: str) -> int:
        w = w.strip(self.strip).lower()
        n = len(self.fixed)
        return self.fixed.get(w, zlib.crc32(w.encode()) % (self.vocab - 1 - n) + 1 + n)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        empty = [] if self.empty_id is None else [self.empty_id]
        ids = [[self.word_id(w) for w in t.split()][: self.max_len] or empty for t in texts]
        n = self.length or max(max(len(i) for i in ids), 1)
        out = torch.zeros(len(ids), n, dtype=torch.long)
        for r, i in enumerate(ids):
            out[r, : len(i)] = torch.tensor(i, dtype=torch.long)
        return {"input_ids": out, "attention_mask": (out != 0).long()}


def tiny_config(dim: int, size: int, spec: str = "test:tiny", backend: str = "test", **kw) -> ModelConfig:
    """A ModelConfig for a fake: ``preprocess`` defaults to {"size": size} (CLIP mean/std); ``kw``: other
    ModelConfig fields (``init_logit_scale``, ``init_logit_bias`` for a SigLIP-like fake, ``options``)."""
    kw.setdefault("preprocess", {"size": size})
    return ModelConfig(backend=backend, spec=spec, embed_dim=dim, **kw)


def bag(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the word axis: [B, L, W], [B, L] -> [B, W] (an empty text -> zeros)."""
    m = mask.unsqueeze(-1).float()
    return (emb * m).sum(1) / m.sum(1).clamp(min=1)


class TinyClip(ClipModel):
    """Pooled colours -> linear ``img``; a bag of hashed words ``emb`` -> linear ``txt`` (if ``text_proj``).

    Weights: a generator seeded with ``seed`` draws, in ``order``, each listed tensor as
    ``randn * scale`` (the word table ``randn * emb_scale``; biases zero with ``zero_bias``);
    ``"logit_scale"`` in ``order`` draws that too. ``order`` is also the order the layers are built
    (and so what PyTorch's default init takes from the global RNG). ``seed=None``: no draw at all.
    ``text_calls`` counts text feature passes (so a test can see a cache hit).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        grid: int = 4,
        vocab: int = 512,
        width: int | None = None,
        text_proj: bool = True,
        split: str = "head",
        scale: float = 0.2,
        emb_scale: float | None = None,
        zero_bias: bool = False,
        order: Sequence[str] = ("img", "emb", "txt"),
        seed: int | None = 0,
        tokenizer: object | None = None,
    ) -> None:
        if split not in ("head", "features", "locked"):
            raise ValueError(f"split must be head, features or locked, not {split!r}")
        super().__init__(config)
        dim, width = config.embed_dim, width or config.embed_dim
        self.grid, self.split, self.text_calls = grid, split, 0
        self.tokenizer = tokenizer if tokenizer is not None else HashTokenizer(vocab)
        self.txt: nn.Linear | None = None
        make = {
            "img": lambda: nn.Linear(3 * grid * grid, dim),
            "emb": lambda: nn.Embedding(vocab, width, padding_idx=0),
            "txt": lambda: nn.Linear(width, dim) if text_proj else None,
        }
        for name in order:
            if name in make:
                setattr(self, name, make[name]())
        if seed is not None:
            self._draw(torch.Generator().manual_seed(seed), order, scale, emb_scale, zero_bias)
        if split == "locked":
            self.emb.requires_grad_(False)

    @torch.no_grad()
    def _draw(
        self, g: torch.Generator, order, scale: float, emb_scale: float | None, zero_bias: bool
    ) -> None:
        for name in order:
            mod = self if name == "logit_scale" else getattr(self, name)
            if mod is None:
                continue
            params = [mod.logit_scale] if mod is self else list(mod.parameters())
            for p in params:
                if zero_bias and p is getattr(mod, "bias", None):
                    p.zero_()
                else:
                    s = emb_scale if name == "emb" and emb_scale is not None else scale
                    p.copy_(torch.randn(p.shape, generator=g) * s)
        self.emb.weight[0].zero_()  # the padding row (always masked out: no embedding changes)

    @property
    def image_locked(self) -> bool:
        return self.split == "locked" or bool(self.config.options.get("lock_image"))

    @property
    def text_locked(self) -> bool:
        return self.split == "locked" or bool(self.config.options.get("lock_text"))

    def pool(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(pixels, self.grid).flatten(1)

    def text_bag(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return bag(self.emb(tokens["input_ids"]), tokens["attention_mask"])

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": pixels} if self.split == "head" else {"pooled": self.pool(pixels)}

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x = feats["pooled"] if "pooled" in feats else self.pool(feats["pixels"])
        return self.img(x)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.text_calls += 1
        return dict(tokens) if self.split == "head" else {"pooled": self.text_bag(tokens)}

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x = feats["pooled"] if "pooled" in feats else self.text_bag(feats)
        return x if self.txt is None else self.txt(x)
