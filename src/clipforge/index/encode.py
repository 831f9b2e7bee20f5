"""Model-side helpers shared by index build, index search and the server.

Loading a model goes through ``clipforge.models.load_model`` (imported lazily so ``clipforge --help``
stays fast and the index code works with any :class:`ClipModel`, including test doubles). Encoding
runs under ``torch.inference_mode`` and returns float32 numpy rows, L2-normalized.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipforge.data.decode import SkipSample, decode_image
from clipforge.models.base import ClipModel

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_model_spec(spec: str | ClipModel, **options: Any) -> ClipModel:
    """A model from a spec string or saved directory (via the models package); a ClipModel passes through."""
    if isinstance(spec, ClipModel):
        return spec.eval()
    try:
        from clipforge.models import load_model
    except ImportError as e:  # the models package is a separate stage; say what is missing
        raise RuntimeError(
            f"cannot load model {spec!r}: clipforge.models.load_model is unavailable ({e})"
        ) from e
    return load_model(spec, **options).eval()


def model_fingerprint(model: ClipModel) -> str:
    """Short digest of config + a slice of every weight: tells a resumed build it has the same model."""
    h = hashlib.sha1()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())  # tuple == list
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.detach().reshape(-1)[:256].float().cpu().numpy()
        h.update(flat.tobytes())
    return h.hexdigest()[:16]


def model_device(model: ClipModel) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 autocast is ~3x faster
    than fp32 for a MiniLM text tower; elsewhere it is emulated and slower, so ``auto`` stays fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(model: ClipModel, precision: str) -> str:
    """``fp32`` | ``bf16`` | ``auto`` -> the precision to run at (``auto``: bf16 where it is native)."""
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    if precision != "auto":
        return precision
    dev = model_device(model)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if dev.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(model: ClipModel, precision: str) -> contextlib.AbstractContextManager:
    """A bf16 autocast context for inference (weights stay fp32; outputs are cast back to float32 by
    the embed helpers). Autocast state is thread-local: enter it on the thread that runs the model."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(model_device(model).type, dtype=torch.bfloat16)


def _tokens(model: ClipModel, texts: list[str]) -> dict[str, torch.Tensor]:
    dev = model_device(model)
    return {k: v.to(dev) for k, v in model.tokenize(texts).items()}


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalize rows in float32 (a zero row stays zero instead of becoming NaN)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


@torch.inference_mode()
def embed_texts(model: ClipModel, texts: Sequence[str], chunk: int = 8) -> np.ndarray:
    """Texts -> [B, D] float32 unit rows.

    Big batches are encoded in length-sorted chunks of ``chunk``: each chunk is padded only to its own
    longest text, which saves ~25% of a MiniLM's CPU time on caption-like queries (padding is wasted
    work). Each chunk is tokenized as a normal batch, so models that pool specially see what they expect.
    """
    if not texts:
        return np.zeros((0, model.config.embed_dim), dtype=np.float32)
    texts = list(texts)
    if len(texts) <= chunk:
        return model.encode_text(_tokens(model, texts)).float().cpu().numpy()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = []
    for j in range(0, len(order), chunk):
        chunk_texts = [texts[i] for i in order[j : j + chunk]]
        parts.append(model.encode_text(_tokens(model, chunk_texts)).float().cpu().numpy())
    out = np.empty_like(np.concatenate(parts))
    out[order] = np.concatenate(parts)
    return out


@torch.inference_mode()
def embed_pixels(model: ClipModel, pixels: torch.Tensor) -> np.ndarray:
    """Preprocessed pixels [B, 3, S, S] -> [B, D] float32 unit rows."""
    if pixels.shape[0] == 0:
        return np.zeros((0, model.config.embed_dim), dtype=np.float32)
    return model.encode_image(pixels.to(model_device(model))).float().cpu().numpy()


def embed_images(model: ClipModel, images: Sequence[Image.Image]) -> np.ndarray:
    """PIL images -> [B, D] float32 unit rows (model's eval preprocessing)."""
    if not images:
        return np.zeros((0, model.config.embed_dim), dtype=np.float32)
    return embed_pixels(model, torch.stack([model.preprocess(im) for im in images]))


def fetch_bytes(url: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    """GET ``url`` with a size cap (streamed, so a huge body is refused without being read whole)."""
    import requests

    with requests.get(url, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        declared = int(r.headers.get("content-length") or 0)
        if declared > max_bytes:
            raise ValueError(f"image at {url} is {declared} bytes > limit {max_bytes}")
        buf = io.BytesIO()
        for chunk in r.iter_content(1 << 16):
            buf.write(chunk)
            if buf.tell() > max_bytes:
                raise ValueError(f"image at {url} exceeds limit {max_bytes} bytes")
        return buf.getvalue()


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
