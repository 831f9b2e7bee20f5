"""The ingest resize rules: longer side <= N (``--max-side``) or shortest side to S (``--shortest-side``).

The shortest-side rule is img2dataset's ``resize_mode=keep_ratio`` (albumentations ``SmallestMaxSize``),
so a shard set written by either tool has the same image sizes: scale = S / min(w, h), each side
``max(1, round(side * scale))`` (Python's round, as there), no crop; images smaller than S are
upsampled unless ``only_if_bigger`` (img2dataset's ``resize_only_if_bigger``; an image whose shortest
side equals S is never resized). Filters follow its defaults: area averaging when shrinking (cv2
``INTER_AREA``; Pillow's ``BOX`` is the same box filter), Lanczos when enlarging.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class ResizePlan:
    """What to do with one image: the output size and filter, or ``size is None`` to keep it as is."""

    size: tuple[int, int] | None
    resample: Image.Resampling = Image.Resampling.LANCZOS
    shrinks: bool = False  # the output has fewer pixels: JPEG draft decoding may be used


def shortest_side_size(w: int, h: int, side: int, only_if_bigger: bool = False) -> tuple[int, int] | None:
    """(w, h) after scaling the shortest side to ``side``; None when no resize applies."""
    if only_if_bigger and min(w, h) <= side:
        return None
    scale = side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return None if size == (w, h) else size


def max_side_size(w: int, h: int, side: int) -> tuple[int, int] | None:
    """(w, h) after shrinking so the longer side is ``side``; None when it already fits (never enlarges)."""
    if max(w, h) <= side:
        return None
    scale = side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def plan_resize(
    w: int,
    h: int,
    max_side: int | None = None,
    shortest_side: int | None = None,
    only_if_bigger: bool = False,
) -> ResizePlan:
    """The resize for a ``w`` x ``h`` image under the ingest options (at most one rule is set)."""
    if max_side and shortest_side:
        raise ValueError("give --max-side or --shortest-side, not both")
    if shortest_side:
        size = shortest_side_size(w, h, shortest_side, only_if_bigger)
        down = min(w, h) > shortest_side
        return ResizePlan(size, Image.Resampling.BOX if down else Image.Resampling.LANCZOS, down)
    if max_side:
        size = max_side_size(w, h, max_side)
        return ResizePlan(size, Image.Resampling.LANCZOS, size is not None)
    return ResizePlan(None)
