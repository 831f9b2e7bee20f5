"""What a captioner is conditioned on, computed through the one encode layer (``models/encode.py``).

Two kinds of condition vector per image:

- ``embedding``: the CLIP image embedding (unit norm) - the space text-only captioners share with
  text embeddings, and what ``caption run`` can compute for any model;
- ``features``: the pooled output of a *frozen* image tower (e.g. multiscale EfficientNet-Lite0,
  1904 values): richer than a 512-d head output, best for paired captioners on locked towers.

Training sets come from the locked-tower feature cache (``train/cache.py``: computed once per shard,
reused across runs, text features of all captions included); images without a locked tower, and the
shards of ``caption run`` / evaluation, go through :func:`clipforge.models.encode.encode_shards`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards
from clipforge.models.encode import embed_pil_images, embed_texts, encode_shards, eval_mode, model_device

KINDS = ("features", "embedding")
CONDITION_KINDS = (*KINDS, "spatial")  # spatial: image tokens [N, T, C] (caption/spatial.py)


@dataclass
class Conditions:
    """Condition vectors of some images (row i for ``keys[i]``) and their reference captions."""

    keys: list[str]
    cond: torch.Tensor  # [N, C] float32
    captions: list[list[str]]
    bad: BadSampleReport = field(default_factory=BadSampleReport)
    fields: dict[str, list[Any]] = field(default_factory=dict)  # per-row extras (e.g. "shard")

    def __len__(self) -> int:
        return len(self.keys)


def pool_features(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """A frozen tower's feature dict -> one vector per image ([B, L, C] token maps are mean-pooled)."""
    for name in ("pooled", "tokens", "map"):
        if name in feats:
            x = feats[name].float()
            if x.ndim == 3:
                return x.mean(1)
            if x.ndim == 4:
                return x.mean((2, 3))
            return x
    raise ValueError(f"no poolable image features in {sorted(feats)} (need a locked image tower)")


@torch.inference_mode()
def head_embeddings(model: Any, feats: dict[str, torch.Tensor], side: str, batch: int = 1024) -> torch.Tensor:
    """Unit embeddings from cached frozen features through the model's (trained) heads."""
    head = model.image_head if side == "image" else model.text_head
    n = next(iter(feats.values())).shape[0]
    out = []
    with eval_mode(model):
        for s in range(0, n, batch):
            out.append(
                F.normalize(head({k: v[s : s + batch].float() for k, v in feats.items()}).float(), dim=-1)
            )
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def check_kind(model: Any, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"condition kind {kind!r}: one of {', '.join(KINDS)}")
    if kind == "features" and not model.image_locked:
        raise ValueError("condition=features needs a locked image tower (its frozen features); use embedding")


@torch.inference_mode()
def image_conditions(model: Any, images: list[Any], kind: str) -> torch.Tensor:
    """Condition vectors of PIL images (the server's uploads), same preprocessing as the shard loop."""
    check_kind(model, kind)
    if kind == "embedding":
        return torch.from_numpy(np.array(embed_pil_images(model, images)))
    pixels = torch.stack([model.preprocess(im) for im in images]).to(model_device(model))
    with eval_mode(model):
        return pool_features(model.image_features(pixels)).float().cpu()


def shard_conditions(
    model: Any,
    shards: str | list[str],
    kind: str,
    *,
    batch_size: int = 64,
    workers: int = 1,
    precision: str = "fp32",
    prepare: Any = None,
    fields: tuple[str, ...] = ("captions",),
    decode: Any = None,
) -> Conditions:
    """Condition vectors of every decodable image of ``shards`` via the one shard loop."""
    check_kind(model, kind)
    report = BadSampleReport()
    keys: list[str] = []
    rows: list[torch.Tensor] = []
    extra: dict[str, list[Any]] = {}
    stream = encode_shards(
        model, expand_shards(shards), prepare=prepare, fields=fields, decode=decode, batch_size=batch_size,
        workers=workers, precision=precision, features=kind == "features", report=report,
    )  # fmt: skip
    for b in stream:
        if not len(b):
            continue
        keys += b.keys
        rows.append(pool_features(b.features) if kind == "features" else torch.from_numpy(np.array(b.emb)))
        for k, v in b.fields.items():
            extra.setdefault(k, []).extend(v.tolist() if isinstance(v, torch.Tensor) else list(v))
    if not keys:
        raise ValueError(f"no decodable images in {shards}: {report.summary()}")
    captions = extra.pop("captions", [[] for _ in keys])
    return Conditions(keys, torch.cat(rows).float(), captions, report, extra)


def conditions_of_kind(model: Any, shards: str | list[str], kind: str, **kw: Any) -> Conditions:
    """:func:`shard_conditions` for any condition kind (``spatial``: float16 image tokens)."""
    if kind == "spatial":
        from clipforge.caption.spatial import shard_spatial_conditions

        return shard_spatial_conditions(model, shards, **kw)
    return shard_conditions(model, shards, kind, **kw)


@dataclass
class TrainingSet:
    """Everything a captioner trains on: per-image conditions, captions and (optionally) their text
    embeddings, flattened with ``text_offsets`` (captions of image i are rows offsets[i]:offsets[i+1])."""

    cond: Conditions
    text: torch.Tensor | None = None
    text_offsets: torch.Tensor | None = None
    cache_dir: str | None = None


def training_set(
    model: Any,
    shards: str | list[str],
    kind: str,
    *,
    text: bool,
    cache_root: str | Path | None,
    batch_size: int = 128,
    workers: int = 1,
    progress: bool = True,
) -> TrainingSet:
    """Conditions of the training images (+ text embeddings of all captions when ``text``).

    With a locked image tower the feature cache is used (built on first use under ``cache_root``);
    otherwise every image is encoded through the shard loop.
    """
    urls = expand_shards(shards)
    if model.image_locked and cache_root is not None:
        from clipforge.train.cache import load_or_build_cache

        report = BadSampleReport()
        data, root = load_or_build_cache(
            model, urls, cache_root, batch_size=batch_size, workers=workers, report=report, progress=progress
        )
        check_kind(model, kind)
        vec = pool_features(data.image) if kind == "features" else head_embeddings(model, data.image, "image")
        cond = Conditions(list(data.keys), vec.float(), [list(c) for c in data.captions], report)
        txt = offsets = None
        if text:
            if data.text is not None:
                txt, offsets = head_embeddings(model, data.text, "text"), data.text_offsets
            else:
                txt, offsets = caption_embeddings(model, cond.captions)
        return TrainingSet(cond, txt, offsets, str(root))
    cond = shard_conditions(model, urls, kind, batch_size=batch_size, workers=workers)
    txt, offsets = caption_embeddings(model, cond.captions) if text else (None, None)
    return TrainingSet(cond, txt, offsets)


def caption_embeddings(model: Any, captions: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit text embeddings of every caption of every image, flattened, and the [N + 1] offsets."""
    flat = [c for caps in captions for c in caps]
    emb = torch.from_numpy(np.array(embed_texts(model, flat)))
    counts = torch.tensor([len(c) for c in captions], dtype=torch.long)
    return emb, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
