"""Evaluation's store on top of the one encode layer: image sets in canonical order, text rows.

The encoding itself (workers decode + preprocess, the main process runs the image tower, texts in
length-sorted batches) is :mod:`clipforge.models.encode`; this module keeps what evaluation stores.
Every image set is returned sorted by ``(shard index, key)`` so results never depend on the number of
ranks/workers. Under torchrun each rank embeds its own samples (ShardDataset splits by rank) and the
pieces are gathered on every rank (see :mod:`clipforge.evaluate.dist`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clipforge.data.decode import DecodeConfig
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards, shard_name
from clipforge.data.transforms import ImageTransform, PreprocessConfig
from clipforge.evaluate import dist
from clipforge.models import encode

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Embedded images of some shards: row i of ``emb`` belongs to ``keys[i]``."""

    emb: torch.Tensor  # [N, D] float32, L2-normalized
    keys: list[str]
    shards: list[str]  # shard name per row
    labels: torch.Tensor | None = None  # [N] long, when decoded with labels
    captions: list[list[str]] | None = None  # per row, when decoded with captions
    bad: BadSampleReport = field(default_factory=BadSampleReport)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: np.ndarray | list[int]) -> ImageSet:
        idx = list(map(int, idx))
        return ImageSet(
            emb=self.emb[idx],
            keys=[self.keys[i] for i in idx],
            shards=[self.shards[i] for i in idx],
            labels=self.labels[idx] if self.labels is not None else None,
            captions=[self.captions[i] for i in idx] if self.captions is not None else None,
            bad=self.bad,
            seconds=self.seconds,
        )


def eval_transform(model: Any, image_size: int | None = None) -> ImageTransform:
    """The model's eval preprocessing, optionally at another resolution (cheaper for convnets)."""
    cfg = model.preprocess.cfg
    if image_size and image_size != cfg.size:
        cfg = PreprocessConfig.from_dict({**cfg.to_dict(), "size": int(image_size)})
    return ImageTransform(cfg, train=False)


def embed_images(
    model: Any,
    shards: str | list[str],
    *,
    labels: bool = False,
    captions: bool = False,
    batch_size: int = 64,
    workers: int = 1,
    image_size: int | None = None,
    channels_last: bool = True,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "embed images",
) -> ImageSet:
    """Embed every decodable image of ``shards`` -> :class:`ImageSet` (gathered over ranks).

    Undecodable samples (and, with ``labels``/``captions``, samples missing them) are skipped and
    counted in ``ImageSet.bad``; nothing is lost silently. JPEGs larger than twice the eval size are
    DCT-draft-decoded (much faster; pixels differ from a full decode by resampling noise only). The
    model runs on its own device (``device`` is accepted for compatibility and ignored).
    """
    from tqdm import tqdm

    encode.autocast(precision)  # validate before any work
    urls = expand_shards(shards)
    names = [shard_name(u) for u in urls]
    shard_index: dict[str, int] = {}
    for i, n in enumerate(names):  # same file name in two dirs: rows still order by (first index, key)
        shard_index.setdefault(n, i)
    transform = eval_transform(model, image_size)
    fields = ("label",) * labels + ("captions",) * captions
    report = BadSampleReport()
    rank, world = dist.rank_world()
    emb, keys, sidx, labs, caps = encode.RowBuffer(), [], [], [], []
    t0 = time.perf_counter()
    bar = tqdm(desc=desc, unit="img", disable=not progress or rank != 0, leave=False)
    batches = encode.encode_shards(
        model,
        urls,
        prepare=encode.Prepare(transform, fields),
        decode=DecodeConfig(image=True, caption=captions, label=labels, draft_size=transform.cfg.size),
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        channels_last=channels_last,
        rank=rank,
        world=world,
        report=report,
    )
    for b in batches:
        if not b.keys:
            continue
        emb.append(b.emb)
        keys.extend(b.keys)
        sidx.extend(shard_index.get(s, -1) for s in b.fields["shard"])
        if labels:
            labs.extend(b.fields["label"].tolist())
        if captions:
            caps.extend(b.fields["captions"])
        bar.update(len(b))
    bar.close()
    local = {
        "emb": emb.array(),
        "keys": keys,
        "sidx": sidx,
        "labels": labs,
        "captions": caps,
        "bad": report.to_dict(),
    }
    parts = dist.all_gather_object(local)
    merged = _merge(parts, names, labels, captions)
    merged.seconds = time.perf_counter() - t0
    if merged.bad.total:
        log.warning("%s: skipped %d bad samples (%s)", desc, merged.bad.total, merged.bad.summary())
    if len(merged) == 0:
        raise ValueError(f"no decodable images in {len(urls)} shard(s): {merged.bad.summary()}")
    return merged


def _merge(parts: list[dict[str, Any]], names: list[str], labels: bool, captions: bool) -> ImageSet:
    """Concatenate per-rank pieces and sort rows by (shard index, key): the canonical order."""
    report = BadSampleReport()
    rows: list[tuple[int, str, int, int]] = []  # (shard idx, key, part, row)
    for p_i, p in enumerate(parts):
        report.merge(p["bad"])
        rows.extend((s, k, p_i, r) for r, (s, k) in enumerate(zip(p["sidx"], p["keys"])))
    rows.sort(key=lambda t: (t[0], t[1]))
    dims = {p["emb"].shape[1] for p in parts if len(p["keys"])}
    dim = dims.pop() if dims else 0
    emb = np.empty((len(rows), dim), dtype=np.float32)  # sized once, filled part by part
    part_of = np.fromiter((p for _, _, p, _ in rows), dtype=np.int64, count=len(rows))
    row_of = np.fromiter((r for _, _, _, r in rows), dtype=np.int64, count=len(rows))
    for p_i, p in enumerate(parts):
        sel = np.flatnonzero(part_of == p_i)
        if len(sel):
            emb[sel] = p["emb"][row_of[sel]]
    return ImageSet(
        emb=torch.from_numpy(emb),
        keys=[k for _, k, _, _ in rows],
        shards=[names[s] if 0 <= s < len(names) else "?" for s, _, _, _ in rows],
        labels=torch.tensor([parts[p]["labels"][r] for _, _, p, r in rows], dtype=torch.long)
        if labels
        else None,
        captions=[parts[p]["captions"][r] for _, _, p, r in rows] if captions else None,
        bad=report,
    )


def embed_texts(
    model: Any,
    texts: list[str],
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "embed texts",
    distributed: bool = True,
) -> torch.Tensor:
    """Embed ``texts`` -> [N, D] normalized float32, row i for ``texts[i]``.

    Length-sorted batches (:func:`clipforge.models.encode.embed_texts`); under torchrun each rank
    embeds every ``world``-th text of that order and the rows are gathered back.
    """
    from tqdm import tqdm

    if not texts:
        raise ValueError("no texts to embed")
    rank, world = dist.rank_world() if distributed else (0, 1)
    bar = tqdm(total=len(texts), desc=desc, unit="txt", disable=not progress or rank != 0, leave=False)
    emb = encode.embed_texts(
        model, texts, batch_size, precision, rank=rank, world=world, gather=dist.all_gather_object,
        progress=bar.update,
    )  # fmt: skip
    bar.close()
    return torch.from_numpy(emb)
