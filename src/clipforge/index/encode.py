"""Index-side model access: resolve a model for a build/search; everything else is re-exported.

The encoding lives in :mod:`clipforge.models.encode` and image queries in :mod:`clipforge.index.query`.
The names below stay importable from here for callers not yet switched (serve, benchmarks); new code
imports them from their homes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from clipforge.index.query import (  # noqa: F401  (re-exported: old home)
    IMAGE_SUFFIXES,
    check_image_size,
    fetch_bytes,
    load_image_query,
    looks_like_image_ref,
)
from clipforge.models import encode
from clipforge.models.base import ClipModel
from clipforge.models.encode import (  # noqa: F401  (re-exported: old home)
    cpu_has_native_bf16,
    embed_pixels,
    model_device,
    normalize_rows,
    resolve_precision,
)
from clipforge.models.encode import fingerprint as model_fingerprint  # noqa: F401


def load_model_spec(spec: str | ClipModel, **options: Any) -> ClipModel:
    """A model (eval mode) from a spec string or saved dir via ``clipforge.models.load_model``;
    a ClipModel passes through (so builds and servers accept test doubles and loaded models)."""
    if isinstance(spec, ClipModel):
        return spec.eval()
    from clipforge.models import load_model

    return load_model(spec, **options).eval()


def autocast(a: Any, b: Any = "cpu") -> contextlib.AbstractContextManager:
    """:func:`clipforge.models.encode.autocast`; the old ``(model, precision)`` order is accepted too."""
    return encode.autocast(a, b) if isinstance(a, str) else encode.autocast(b, a)


def embed_texts(model: ClipModel, texts: Sequence[str], chunk: int = 8) -> np.ndarray:
    """Texts -> [B, D] float32 unit rows in length-sorted batches of ``chunk`` (old home's signature)."""
    return encode.embed_texts(model, texts, batch_size=chunk)


def embed_images(model: ClipModel, images: Sequence[Any]) -> np.ndarray:
    """PIL images -> [B, D] float32 unit rows: :func:`clipforge.models.encode.embed_pil_images`."""
    return encode.embed_pil_images(model, images)
