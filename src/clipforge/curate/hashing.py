"""Perceptual hashes (pHash, dHash) with numpy + Pillow, and Hamming distances.

Why not the ``imagehash`` package: both hashes are ~10 lines of numpy, and owning them keeps the bit
layout stable (hashes are stored in score tables and compared across runs). Hashes are returned as
signed int64 (Parquet has no uint64 that every reader handles) holding the 64 bits big-endian.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _bits_to_int64(bits: np.ndarray) -> int:
    packed = np.packbits(bits.astype(np.uint8).reshape(-1))
    return int(np.frombuffer(packed.tobytes(), dtype=">i8")[0])


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis (rows = frequencies), so ``D @ x @ D.T`` is the 2-D DCT."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


_DCT32 = _dct_matrix(32)


def _gray(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(img.convert("L").resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def phash(img: Image.Image) -> int:
    """pHash: 32x32 grayscale -> 2-D DCT -> top-left 8x8 low frequencies -> bit = coef > median.

    Robust to rescaling, JPEG re-encoding and small brightness changes (the near-duplicate cases).
    """
    x = _gray(img, (32, 32))
    low = (_DCT32 @ x @ _DCT32.T)[:8, :8]
    return _bits_to_int64(low > np.median(low))


def dhash(img: Image.Image) -> int:
    """dHash: 9x8 grayscale -> bit = pixel brighter than its right neighbour (gradient signs)."""
    x = _gray(img, (9, 8))
    return _bits_to_int64(x[:, 1:] > x[:, :-1])


def to_bytes(hashes: np.ndarray) -> np.ndarray:
    """int64 hashes [N] -> uint8 [N, 8] big-endian codes (faiss binary index layout)."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=">i8")).view(np.uint8).reshape(-1, 8)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return int(bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1"))
