"""``image`` stage: size, aspect ratio, format validity, blank detection and perceptual hashes.

A sample whose image does not decode still gets a row (``image_valid = False`` and the reason in
``image_error``) so a filter removes it and the count is visible, instead of it vanishing in a reader.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from clipforge.curate.hashing import dhash, phash
from clipforge.curate.stages import Batch, Columns, Context, batch_images, register_stage


def image_format(data: bytes | None) -> str | None:
    """Container format from the header (JPEG, PNG, WEBP...), None when Pillow cannot identify it."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:
        return None


def blank_stats(img: Image.Image) -> tuple[float, float]:
    """(pixel std, share of pixels equal to the most common 16-level gray bin) on a 64x64 thumbnail.

    Near-uniform images (blank placeholders, "image not available" tiles, solid colors) have a tiny std
    or one dominant bin; both are cheap on a thumbnail.
    """
    x = np.asarray(img.convert("L").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
    hist = np.bincount((x // 16).astype(np.int64).ravel(), minlength=16)
    return float(x.std()), float(hist.max() / x.size)


@register_stage("image")
def image_stage(batch: Batch, ctx: Context) -> Columns:
    """Width, height, aspect, format/validity, blank score, sha256, pHash and dHash of each image."""
    imgs = batch_images(batch, ctx.config.draft_size)
    errors = batch["__image_errors__"]
    cols: dict[str, list] = {
        k: []
        for k in (
            "width",
            "height",
            "aspect",
            "image_format",
            "image_valid",
            "image_error",
            "pixel_std",
            "dominant_frac",
            "is_blank",
            "sha256",
            "phash",
            "dhash",
        )
    }
    for data, img, err in zip(batch["image_bytes"], imgs, errors):
        cols["sha256"].append(hashlib.sha256(data).hexdigest() if data else None)
        cols["image_format"].append(image_format(data))
        cols["image_valid"].append(img is not None)
        cols["image_error"].append(err)
        if img is None:
            for k in (
                "width",
                "height",
                "aspect",
                "pixel_std",
                "dominant_frac",
                "is_blank",
                "phash",
                "dhash",
            ):
                cols[k].append(None)
            continue
        w, h = img.size
        if ctx.config.draft_size:  # drafting shrinks JPEGs: report the stored size from the header
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        std, dom = blank_stats(img)
        cols["width"].append(w)
        cols["height"].append(h)
        cols["aspect"].append(w / h if h else None)
        cols["pixel_std"].append(std)
        cols["dominant_frac"].append(dom)
        cols["is_blank"].append(bool(std < 4.0 or dom > 0.97))
        cols["phash"].append(phash(img))
        cols["dhash"].append(dhash(img))
    return cols
