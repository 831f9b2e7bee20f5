"""Image queries for search (CLI and server): a local path or an http(s) URL -> a checked PIL image.

Queries are untrusted input: the body is capped while streaming, and the header's pixel count is
checked before any pixel is decoded.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from clipforge.data.decode import SkipSample, decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def fetch_bytes(url: str, max_bytes: int, timeout: float = 10.0, allow_private: bool = True) -> bytes:
    """GET ``url`` through the one safe fetch (size cap, wall-clock deadline, redirects re-checked).

    ``allow_private`` defaults to True here because this path serves the trusted command line
    (``clipforge index search INDEX URL``); the server passes its own setting.
    """
    from clipforge.data.fetch import FetchError, safe_fetch

    try:
        return safe_fetch(url, max_bytes=max_bytes, timeout_s=timeout, allow_private=allow_private).data
    except FetchError as e:
        raise ValueError(f"cannot fetch image {url}: {e.public}") from None


def check_image_size(data: bytes, max_pixels: int) -> None:
    """Refuse images whose header declares more than ``max_pixels`` before decoding any pixel data."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as e:
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {str(e)[:200]}") from None
    if w * h > max_pixels:
        raise SkipSample("image_too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")


def load_image_query(ref: str, max_bytes: int = 20 << 20, max_pixels: int = 50_000_000) -> Image.Image:
    """An image query given as a local path or an http(s) URL -> RGB PIL image (SkipSample if bad)."""
    if ref.startswith(("http://", "https://")):
        data = fetch_bytes(ref, max_bytes)
    else:
        p = Path(ref).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"image query not found: {ref}")
        if p.stat().st_size > max_bytes:
            raise ValueError(f"image {ref} is larger than {max_bytes} bytes")
        data = p.read_bytes()
    check_image_size(data, max_pixels)
    return decode_image(data)


def looks_like_image_ref(query: str) -> bool:
    """True for an http(s) URL or an existing file with an image suffix (so `search INDEX cat.jpg` works)."""
    if query.startswith(("http://", "https://")):
        return query.lower().split("?")[0].endswith(IMAGE_SUFFIXES)
    p = Path(query).expanduser()
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
