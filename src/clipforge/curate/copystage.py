"""``copy`` stage: copy-detection descriptors (frozen pre-head features) and synthetic calibration copies.

Per sample: the raw descriptor (``__emb_copy__``, saved as ``STEM.copy.npy``). For a deterministic
share ``dedup.copy_calib_rate`` of samples (by key, so engines and resumes agree), also one synthetic
near copy of the image and its descriptor (``__emb_copyaug__``) and the copy's kind
(``copy_calib_kind``) and pHash (``copy_calib_phash``): the ``dedup`` stage calibrates its descriptor
threshold on them (no labels).
With a fixed ``dedup.copy_threshold`` no synthetic copy is made.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from clipforge.curate.clipscore import model_transform
from clipforge.curate.copydetect import calib_pick, image_descriptors, key_rng, synthetic_copy
from clipforge.curate.hashing import phash
from clipforge.curate.stages import Batch, Columns, Context, batch_images, register_stage


def descriptor_dim(ctx: Context) -> int:
    """Descriptor size of the model (one dummy forward, memoized): empty batches need it too."""

    def build() -> int:
        size = int(model_transform(ctx)(Image.new("RGB", (32, 32))).shape[-1])
        return int(image_descriptors(ctx.model, torch.zeros(1, 3, size, size), 1.0).shape[1])

    return ctx.cached("copy_dim", build)


def _descriptors(ctx: Context, images: list, dim: int) -> np.ndarray:
    out = np.full((len(images), dim), np.nan, dtype=np.float32)
    ok = [i for i, im in enumerate(images) if im is not None]
    if ok:
        transform = model_transform(ctx)
        pixels = torch.stack([transform(images[i]) for i in ok])
        out[ok] = image_descriptors(ctx.model, pixels, ctx.config.dedup.copy_lowpass)
    return out


@register_stage("copy", needs_model=True)
def copy_stage(batch: Batch, ctx: Context) -> Columns:
    """Copy-detection descriptors (pre-head features) + synthetic copies of a sample for calibration."""
    cfg = ctx.config.dedup
    imgs = batch_images(batch, ctx.config.draft_size)
    dim = descriptor_dim(ctx)
    desc = _descriptors(ctx, imgs, dim)
    rate = cfg.copy_calib_rate if cfg.copy_threshold is None else 0.0
    kinds = [calib_pick(k, rate, cfg.seed) if im is not None else None for k, im in zip(batch["key"], imgs)]
    augs = [
        synthetic_copy(im, kind, key_rng(k, cfg.seed)) if kind else None
        for k, im, kind in zip(batch["key"], imgs, kinds)
    ]
    return {
        "__emb_copy__": desc,
        "__emb_copyaug__": _descriptors(ctx, augs, dim),
        "copy_calib_kind": kinds,
        "copy_calib_phash": [phash(a) if a is not None else None for a in augs],  # for near_rule=or
    }
