"""Raw sample bytes -> decoded fields (RGB image, caption(s), label, metadata), or a recorded skip.

Every way a sample can be bad maps to one short reason string, so reports can be counted and compared.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from clipforge.data.fields import (
    TEXT_EXTS,
    check_text,
    parse_meta,
    resolve_caption,
    resolve_captions,
    resolve_label,
)
from clipforge.data.skip import SkipSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
__all__ = [
    "IMAGE_EXTS",
    "TEXT_EXTS",
    "SkipSample",
    "DecodeConfig",
    "decode_image",
    "decode_sample",
    "decode_text",
]

# Pillow's default bomb limit (~89M pixels) is kept; above 2x it Pillow raises DecompressionBombError.
Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way HF's ``convert_to_rgb`` does (alpha over white).

    16-bit and 32-bit integer modes are scaled down to 8 bits instead of being clipped.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


class PixelBudget:
    """Caps the pixels being decoded at the same time in this process (issue 11.15).

    Decode threads (ingest, inspect, the server) each hold ``width x height`` units while they decode;
    one that would push the total over ``max_pixels`` waits, unless nothing else is decoding (so one
    image larger than the budget still goes through, alone). Peak decode memory per process is then
    about ``max(budget, largest image) x 4 bytes`` instead of ``threads x largest``. DataLoader worker
    processes decode one image at a time, so for them the per-image pixel cap is the bound. A thread
    that already holds a share (ingest holds one over decode + resize + encode) passes straight through.
    """

    TRIM_PIXELS = 4_000_000  # after a decode this large, hand freed heap pages back (see _trim)

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._local = threading.local()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if getattr(self._local, "depth", 0) or self.max_pixels <= 0:
            self._local.depth = getattr(self._local, "depth", 0) + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        with self._cond:
            while self.used and self.used + pixels > self.max_pixels:
                self._cond.wait()
            self.used += pixels
            self.peak = max(self.peak, self.used)
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()
            if pixels >= self.TRIM_PIXELS:
                _trim()


_LIBC: list = []


def _trim() -> None:
    """``malloc_trim(0)``: return freed heap pages to the OS.

    The CLI keeps freed memory in-process (clipforge.runtime.tune_allocator: fewer page faults for
    tensors), and Pillow allocates images in 16 MB blocks below the mmap threshold, so without this each
    decode thread's arena would keep its largest image forever and the budget would bound nothing
    (measured: 8 x 50 MP PNGs, 8 threads: 2.0 GB either way). A trim costs far less than the decode.
    """
    if not _LIBC:
        try:
            import ctypes
            import ctypes.util

            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


# ~100 MP in flight: two 50 MP images at once, ~400 MB of decoded RGBX. CLIPFORGE_DECODE_BUDGET_MP=0: off.
DECODE_BUDGET = PixelBudget(int(float(os.environ.get("CLIPFORGE_DECODE_BUDGET_MP", "100")) * 1_000_000))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _stable(msg: str) -> str:
    """Drop object addresses (``<_io.BytesIO object at 0x7f...>``) so the same bad sample gives the
    same report in every run and on every engine (reports are compared across resumes and Ray)."""
    return _ADDRESS.sub("", msg)


def decode_image(data: bytes | None, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image; raise :class:`SkipSample` with a reason on failure.

    Reasons: ``missing_image``, ``empty_image``, ``decompression_bomb`` (over Pillow's
    ``Image.MAX_IMAGE_PIXELS``), ``corrupt_image`` (undecodable or truncated bytes).

    ``draft_size``: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay
    >= draft_size (DCT-domain downscaling: far fewer pixels decoded before the resize).
    """
    if data is None:
        raise SkipSample("missing_image")
    if len(data) == 0:
        raise SkipSample("empty_image")
    try:
        img = Image.open(io.BytesIO(data))  # header only; raises DecompressionBombError above 2x the limit
        original_size = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:  # Pillow only warns between 1x and 2x: skip those too
            raise SkipSample(
                "decompression_bomb", f"{img.width}x{img.height} pixels > MAX_IMAGE_PIXELS={limit}"
            )
        if draft_size and img.format == "JPEG":
            # libjpeg scales by 1/2, 1/4 or 1/8 only while both sides stay >= draft_size, so this
            # is a no-op unless the image is at least 2x larger than needed
            img.draft("RGB", (draft_size, draft_size))
        with DECODE_BUDGET.hold(img.width * img.height):  # size after draft: what is really decoded
            img.load()
            rgb = to_rgb(img)
    except SkipSample:
        raise
    except Image.DecompressionBombError as e:
        raise SkipSample("decompression_bomb", str(e)[:200]) from None
    except Exception as e:  # PIL raises many types for broken data: OSError, SyntaxError, ValueError...
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {_stable(str(e))[:200]}") from None
    rgb.info["original_size"] = original_size  # (w, h) before draft: what inspect/side tables report
    rgb.info["decoded_size"] = rgb.size  # != original_size only when draft mode shrank it
    return rgb


def decode_text(data: bytes | None, max_chars: int = 10_000) -> str:
    """Decode a caption; empty, non-UTF-8 and over-long captions are skips with distinct reasons."""
    return check_text(data, max_chars)


@dataclass
class DecodeConfig:
    """What a sample must contain, and decode limits."""

    image: bool = True
    caption: bool = True
    label: bool = False
    draft_size: int | None = None
    max_caption_chars: int = 10_000


def find_image(sample: dict[str, Any]) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def decode_sample(sample: dict[str, Any], cfg: DecodeConfig = DecodeConfig()) -> dict[str, Any]:
    """Raw sample -> ``{"key", "shard", "image", "caption", "captions", "label", "meta"}``.

    Caption(s) and label follow the one rule of :mod:`clipforge.data.fields`; a missing or unusable
    required field is a :class:`SkipSample` with its reason.
    """
    out: dict[str, Any] = {"key": sample["__key__"], "shard": sample.get("__shard__", "")}
    meta = parse_meta(sample)
    out["meta"] = meta
    if cfg.image:
        out["image"] = decode_image(find_image(sample), cfg.draft_size)
    if cfg.caption:
        out["caption"] = resolve_caption(sample, meta, cfg.max_caption_chars)
        out["captions"] = resolve_captions(meta, out["caption"], cfg.max_caption_chars)
    if cfg.label:
        out["label"] = resolve_label(sample, meta)
    return out
