"""Near-copy detection: a descriptor from the frozen image tower's pre-head features, calibrated without labels.

Why: pHash misses mild crops and overlays, and the trained head's embeddings put near copies at cosine
~0.85, among ordinary look-alikes. SSCD (Pizzi et al. 2022) shows that *centered, L2-normalized backbone
descriptors* separate copies from look-alikes; the frozen prefix of the image tower (``image_features``:
the pooled EfficientNet-Lite0 trunk for ``towers:``, the vision pooler for ``hf:``) gives one for free,
computed on the image low-passed 2x (:func:`lowpass`: robust to JPEG, blur and downscaling).

The cosine threshold is calibrated on synthetic copies made from the data itself (no labels): the
``copy`` stage gives a deterministic sample of images (``dedup.copy_calib_rate``) one synthetic copy
each (resize, crop <= 10%, brightness/contrast, JPEG quality or a small text overlay, chosen by key);
:func:`calibrate_threshold` then picks the lowest cosine at which copy->source pairs still make up
>= ``dedup.copy_precision`` of all flagged pairs, the false ones being estimated from each row's
nearest *non-copy* neighbour (a row closer to the source than its synthetic copy is taken for a real
copy, so duplicates already in the data do not pose as look-alikes). Limits: a look-alike closer than
the synthetic copy is not counted as a false pair, and above ``exact_search_max`` rows the neighbours
are searched in a sample of that size (nearest-neighbour cosines grow with N: the cut errs low).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

KINDS = ("resize", "crop", "brightness", "jpeg", "text")
# Edits calibration never makes (:func:`heldout_copy`): benchmarks plant them to test generalization.
HELDOUT_KINDS = (
    "flip",
    "rotate",
    "grayscale",
    "combined",
    "pad",
    "blur",
    "sharpen",
    "downscale",
    "crop_large",
)
# A data row closer to a source than 90% of the synthetic copies are to theirs is taken for a real copy
# when estimating false pairs (lower: more robust to duplicates in the data, less to look-alikes).
COPY_BAR_Q = 0.1
# Descriptors see every image low-passed by this factor (:func:`lowpass`; ``dedup.copy_lowpass``).
DESCRIPTOR_LOWPASS = 2.0
WORDS = ("photo", "copy", "sample", "2024", "flickr", "stock", "(c)", "img", "new", "share")


# -- synthetic copies ----------------------------------------------------------------------------
def key_rng(key: str, seed: int) -> np.random.Generator:
    """A generator that depends only on (seed, key): the same copy on every engine, worker and resume."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def calib_pick(key: str, rate: float, seed: int) -> str | None:
    """The synthetic-copy kind given to ``key`` for calibration, or None (a share ``rate`` is picked)."""
    h = hashlib.sha256(f"calib:{seed}:{key}".encode()).digest()
    if int.from_bytes(h[:8], "little") / 2.0**64 >= rate:
        return None
    return KINDS[h[8] % len(KINDS)]


def synthetic_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A mild near copy of ``img`` of one kind (the edits that re-uploads and reposts make)."""
    img = img.convert("RGB")
    w, h = img.size
    if kind == "resize":
        s = rng.uniform(0.4, 0.9)
        return img.resize((max(8, round(w * s)), max(8, round(h * s))), Image.Resampling.BILINEAR)
    if kind == "crop":  # up to 10% of each side's length removed in total, split between both ends
        fx, fy = rng.uniform(0.03, 0.10, size=2)
        lx, ty = rng.uniform(0, fx) * w, rng.uniform(0, fy) * h
        return img.crop((round(lx), round(ty), round(lx + (1 - fx) * w), round(ty + (1 - fy) * h)))
    if kind == "brightness":
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
        return ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(15, 50)))
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    if kind == "text":  # a short caption-like overlay, about 5-8% of the height
        out = img.copy()
        size = max(6, round(h * rng.uniform(0.05, 0.08)))
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 3))))
        font = ImageFont.load_default(size=size)
        draw = ImageDraw.Draw(out)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        x = rng.uniform(0, max(1, w - (x1 - x0)))
        y = rng.uniform(0, max(1, h - (y1 - y0)))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.text((x, y), text, fill=color, font=font)
        return out
    raise ValueError(f"unknown copy kind {kind!r} ({', '.join(KINDS)})")


def heldout_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A near copy of a kind calibration never makes (``HELDOUT_KINDS``): to measure generalization.

    Why separate from :func:`synthetic_copy`: these edits must stay out of the calibration copies, or a
    benchmark planting them would test the detector on its own calibration families.
    """
    img = img.convert("RGB")
    w, h = img.size
    if kind == "flip":
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind == "rotate":  # 2-5 degrees either way, black corners (no re-crop)
        angle = rng.uniform(2, 5) * rng.choice([-1, 1])
        return img.rotate(float(angle), resample=Image.Resampling.BILINEAR)
    if kind == "grayscale":
        return img.convert("L").convert("RGB")
    if kind == "combined":  # three calibrated edits at once: crop <= 10%, brightness/contrast, JPEG
        for part in ("crop", "brightness", "jpeg"):
            img = synthetic_copy(img, part, rng)
        return img
    if kind == "pad":  # letterbox / pillarbox: a black or white border of 5-15% on two opposite sides
        f = rng.uniform(0.05, 0.15)
        color = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
        dx, dy = (round(f * w), 0) if rng.random() < 0.5 else (0, round(f * h))
        out = Image.new("RGB", (w + 2 * dx, h + 2 * dy), color)
        out.paste(img, (dx, dy))
        return out
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 2.0))))
    if kind == "sharpen":
        return img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(100, 200)), threshold=2))
    if kind == "downscale":  # to 0.25-0.4x (the calibrated resize stops at 0.4x)
        s = rng.uniform(0.25, 0.4)
        return img.resize((max(8, round(w * s)), max(8, round(h * s))), Image.Resampling.BILINEAR)
    if kind == "crop_large":  # 10-20% of each side's length removed (the calibrated crop stops at 10%)
        fx, fy = rng.uniform(0.10, 0.20, size=2)
        lx, ty = rng.uniform(0, fx) * w, rng.uniform(0, fy) * h
        return img.crop((round(lx), round(ty), round(lx + (1 - fx) * w), round(ty + (1 - fy) * h)))
    raise ValueError(f"unknown held-out copy kind {kind!r} ({', '.join(HELDOUT_KINDS)})")


def make_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A copy of any kind, calibrated (``KINDS``) or held out (``HELDOUT_KINDS``)."""
    return synthetic_copy(img, kind, rng) if kind in KINDS else heldout_copy(img, kind, rng)


# -- descriptors ---------------------------------------------------------------------------------
def pool_features(feats: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Frozen-prefix features -> [B, F]: pooled as is, tokens/maps by GeM (p=3, SSCD); None if only pixels."""
    if "pooled" in feats:
        return feats["pooled"].float()
    for name in ("tokens", "x"):
        if name in feats:
            x = feats[name].float()
            x = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x  # -> [B, N, C]
            return x.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3) if x.min() >= 0 else x.mean(1)
    return None


def lowpass(pixels: torch.Tensor, factor: float = DESCRIPTOR_LOWPASS) -> torch.Tensor:
    """Pixels [B, C, H, W] scaled down ``factor`` x (antialiased) and back up to their size.

    Why: the fine detail that JPEG, blur and downscaling destroy in a copy is removed from every image
    alike, so a degraded copy and its source meet halfway. On flickr8k (EfficientNet-Lite0 trunk) a
    factor of 2 raised the descriptor's label-free calibration recall on the five synthetic kinds from
    0.976 to 0.990 at the same 0.99 precision, and its recall on planted copies of held-out kinds
    (``benchmarks/near_copies.py --kinds all``, test) from 0.75 to 0.93; grayscale copies lose (0.91 ->
    0.71: colour weighs more once texture is gone), which pHash covers under ``near_rule=or``. Cost: two
    interpolations per image; descriptors stored by earlier versions are not comparable.
    """
    if factor <= 1:
        return pixels
    h, w = pixels.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    down = F.interpolate(pixels, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


@torch.inference_mode()
def image_descriptors(
    model: Any, pixels: torch.Tensor, lowpass_factor: float = DESCRIPTOR_LOWPASS
) -> np.ndarray:
    """Preprocessed pixels [B, 3, S, S] -> raw descriptors [B, F] float32 (not centered, not normalized).

    The frozen prefix (``model.image_features``) when it holds the trunk; a fully trainable tower has no
    frozen prefix, so its unnormalized embedding is used instead (weaker: that is the trained head).
    The pixels are low-passed first (:func:`lowpass`, by ``lowpass_factor``).
    """
    from clipforge.models import encode

    with encode.eval_mode(model):
        px = lowpass(pixels.to(encode.model_device(model)), lowpass_factor)
        d = pool_features(model.image_features(px))
        if d is None:
            d = model.encode_image(px, normalize=False)
    return encode.to_numpy32(d)


def center_normalize(x: np.ndarray, mean: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SSCD's descriptor post-processing: subtract the set's mean descriptor, then L2-normalize rows.

    Centering removes the direction every image shares (ReLU features are all positive), which is what
    makes unrelated photos sit at cosine ~0.5 and copies at ~0.9 in the raw features. NaN rows stay NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    if mean is None:
        valid = ~np.isnan(x[:, 0]) if len(x) else np.zeros(0, bool)
        mean = x[valid].astype(np.float64).mean(0) if valid.any() else np.zeros(x.shape[1])
    y = x - mean.astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True) + 1e-12
    return y, mean


# -- calibration ---------------------------------------------------------------------------------
def calibrate_threshold(
    pos: np.ndarray, neg: np.ndarray, precision: float = 0.99, covered: np.ndarray | None = None
) -> dict[str, Any]:
    """The cosine cut catching the most synthetic copies while TP(t) / (TP(t) + FP(t)) >= ``precision``.

    Scanning from high to low, the cut stops at the first loss of precision (so precision holds at
    every higher cut too), sits at the lowest copy score reached there and goes halfway down to the
    next score below it (a margin for unseen copies).

    ``pos``: cosine of each synthetic copy to its source; ``neg``: each row's cosine to its nearest
    non-copy neighbour (at most one false pair per row: an upper bound on the false pairs at any t).
    ``covered``: copies another detector already catches (pHash under ``near_rule=or``): they count as
    caught at every t, so the cut only goes as low as the copies left to the descriptor need (the
    combination's recall at the fewest descriptor false pairs). Returns the threshold, the estimated
    recall (of the combination when ``covered`` is given) and precision there, and the counts.
    """
    pos = np.asarray(pos, np.float64)
    if len(pos) == 0:
        raise ValueError("no synthetic copies to calibrate on")
    n_pos, n_cov = len(pos), 0
    if covered is not None:
        n_cov = int(np.asarray(covered, bool).sum())
        pos = pos[~np.asarray(covered, bool)]
    pos, neg = np.sort(pos), np.sort(np.asarray(neg, np.float64))
    cands = np.unique(np.concatenate([pos, neg, [1.0]]))[::-1]  # high to low
    best = None  # (index into cands, tp, fp): the most copies caught while precision holds
    for c, t in enumerate(cands):
        tp = n_cov + len(pos) - np.searchsorted(pos, t, side="left")
        fp = len(neg) - np.searchsorted(neg, t, side="left")
        if tp and tp / (tp + fp) < precision:
            if best is not None:
                break  # going lower only adds false pairs faster than copies
            continue
        if tp and (best is None or tp > best[1]):
            best = (c, tp, fp)
    if best is None:
        c, tp, fp = 0, 0, 0
    else:
        c, tp, fp = best
    # halfway to the next lower score: a margin for copies scoring slightly below the calibration ones
    t = (cands[c] + cands[c + 1]) / 2 if c + 1 < len(cands) else cands[c]
    return {
        "threshold": float(t),
        "recall": float(tp / n_pos),
        "precision": float(tp / max(1, tp + fp)),
        "copies": int(n_pos),
        "covered_by_other": n_cov,
        "non_copies": int(len(neg)),
        "pos_p5": float(np.percentile(pos, 5)) if len(pos) else None,
        "neg_p99": float(np.percentile(neg, 99)) if len(neg) else None,
    }


def nearest_non_copy(
    src: np.ndarray, cp: np.ndarray, ref: np.ndarray, own: np.ndarray, k: int = 16, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each source and of its synthetic copy to their nearest *non-copy* row of ``ref``.

    A row counts as a copy of source ``s`` (and is skipped) when it is ``s`` itself (``own``) or at least
    as close to ``s`` as its synthetic copy is, or as the ``COPY_BAR_Q`` quantile of all synthetic copies
    is when that is lower
    (a near-identical edit such as a mild resize would otherwise make real copies of ``s`` pose as
    look-alikes and push the cut above every copy). Searched among the ``k`` nearest rows (-1 if all of
    them are copies).
    """
    import faiss

    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(np.ascontiguousarray(ref, dtype=np.float32))
    k = min(k + 1, len(ref))
    bar = float(np.quantile((src * cp).sum(1), COPY_BAR_Q)) if len(src) else 1.0
    out_s = np.full(len(src), -1.0, dtype=np.float32)
    out_c = np.full(len(src), -1.0, dtype=np.float32)
    for a in range(0, len(src), chunk):
        s = np.ascontiguousarray(src[a : a + chunk], dtype=np.float32)
        c = np.ascontiguousarray(cp[a : a + chunk], dtype=np.float32)
        pos = np.minimum((s * c).sum(1, keepdims=True), bar)
        own_a = own[a : a + chunk, None]
        sims_s, nn_s = index.search(s, k)
        skip = (nn_s < 0) | (nn_s == own_a) | (sims_s >= pos)
        out_s[a : a + chunk] = np.where(skip, -1.0, sims_s).max(1)
        sims_c, nn_c = index.search(c, k)
        to_src = np.einsum("bkd,bd->bk", ref[np.maximum(nn_c, 0)], s)  # cos(source, each neighbour of c)
        skip = (nn_c < 0) | (nn_c == own_a) | (to_src >= pos)
        out_c[a : a + chunk] = np.where(skip, -1.0, sims_c).max(1)
    return out_s, out_c


def calibrate_from_rows(
    unit: np.ndarray,
    unit_aug: np.ndarray,
    kinds: list[str | None],
    precision: float = 0.99,
    max_ref: int = 50_000,
    seed: int = 0,
    covered: np.ndarray | None = None,
) -> dict[str, Any]:
    """Calibrate on the rows that have a synthetic copy (``unit_aug`` non-NaN).

    ``covered`` (bool per row): the row's synthetic copy is caught by another detector (pHash), see
    :func:`calibrate_threshold`.

    Negatives: for every calibration source and every synthetic copy, its nearest neighbour among the
    data rows that is not a copy of the source (:func:`nearest_non_copy`): the pairs a cut could
    wrongly flag.
    """
    valid = np.flatnonzero(~np.isnan(unit[:, 0]))
    cal = np.array([i for i in valid if not np.isnan(unit_aug[i, 0])], dtype=np.int64)
    if len(cal) == 0 or len(valid) < 2:
        raise ValueError("no calibration rows (too few samples, or dedup.copy_calib_rate is 0)")
    ref_rows = valid
    if len(valid) > max_ref:
        rng = np.random.default_rng(seed)
        ref_rows = np.union1d(rng.choice(valid, max_ref, replace=False), cal)
    where = {int(r): i for i, r in enumerate(ref_rows)}
    own = np.array([where[int(r)] for r in cal], dtype=np.int64)
    ref = np.ascontiguousarray(unit[ref_rows], dtype=np.float32)
    pos = (unit[cal] * unit_aug[cal]).sum(1)
    neg = np.concatenate(nearest_non_copy(unit[cal], unit_aug[cal], ref, own))
    cov = None if covered is None else np.asarray(covered, bool)[cal]
    res = calibrate_threshold(pos, neg, precision, cov)
    res["descriptor_recall"] = round(float((pos >= res["threshold"]).mean()), 4)
    kinds_cal = [kinds[i] for i in cal]
    hit = pos >= res["threshold"]
    if cov is not None:
        hit |= cov
    res["recall_by_kind"] = {
        k: round(float(hit[[kk == k for kk in kinds_cal]].mean()), 4) for k in KINDS if k in kinds_cal
    }
    return res
