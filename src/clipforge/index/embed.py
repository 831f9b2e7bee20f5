"""Embed a shard set into per-shard *parts*: float16 embeddings + one Parquet row per image.

A part is ``parts/<shard name>-<url hash>.{npy,parquet,json}``, each file written atomically and the
JSON last, so a part whose JSON exists is complete. Rerunning a build skips complete parts made by
the same model and settings: an interrupted build over many shards loses at most the shard it was on.
Encoding is the one shard loop (:func:`clipforge.models.encode.encode_shards` over ``ShardDataset``),
so bad samples are skipped and counted, never fatal; a thumbnail JPEG of every image rides in the
row, which is what the server shows at ``/images/{key}`` (no second pass over the shards, and remote
shards work too).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipforge.data.decode import DecodeConfig, decode_sample
from clipforge.data.fields import FieldError, resolve_caption, resolve_captions, resolve_label
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import shard_name
from clipforge.data.transforms import ImageTransform
from clipforge.models import encode
from clipforge.models.base import ClipModel
from clipforge.utils import atomic_path, write_json

log = logging.getLogger(__name__)

RESERVED = {"key", "shard", "source", "caption", "captions", "label", "thumb", "uid"}


@dataclass
class EmbedSettings:
    """What a part depends on besides the shard: a change means the part is rebuilt."""

    model: str  # model fingerprint (config + weights digest)
    thumb_size: int = 160
    max_per_shard: int | None = None

    def matches(self, d: dict[str, Any]) -> bool:
        return all(d.get(k) == v for k, v in asdict(self).items())


def part_stem(url: str) -> str:
    """Shard name + a hash of the full URL: flickr8k/test-000000.tar and cifar10/test-000000.tar differ."""
    name = shard_name(url).replace("/", "_").replace(" ", "_")[:80]
    return f"{name}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def make_thumbnail(img: Image.Image, size: int, quality: int = 82) -> bytes:
    """Shrink-only JPEG thumbnail (small images such as CIFAR's 32x32 are kept as they are)."""
    im = img.copy()
    im.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) and not (isinstance(v, int) and abs(v) > 2**62)


class IndexPrepare(encode.Prepare):
    """Worker-side map on the raw sample: pixels, thumbnail, caption, label, metadata row.

    Captions and labels are optional here (a CIFAR shard has no caption, a web shard no label), unlike
    training where a missing caption is a skip.
    """

    raw = True

    def __init__(self, transform: ImageTransform, thumb_size: int, url: str) -> None:
        super().__init__(transform)
        self.decode_cfg = DecodeConfig(image=True, caption=False)
        self.thumb_size = thumb_size
        self.url = url

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        s = decode_sample(raw, self.decode_cfg)  # image + KEY.json (a bad one is a counted skip)
        meta = s["meta"]
        try:  # caption and label are optional in an index: the one rule of clipforge.data.fields
            caption: str | None = resolve_caption(raw, meta, self.decode_cfg.max_caption_chars)
        except FieldError:
            caption = None
        caps = resolve_captions(meta, None, self.decode_cfg.max_caption_chars)  # KEY.json's list only
        try:
            label: int | None = resolve_label(raw, meta)
        except FieldError:
            label = None
        row: dict[str, Any] = {
            "key": s["key"],
            "shard": s["shard"],
            "source": self.url,
            "caption": caption,
            "captions": caps or None,
            "label": label,
        }
        for k, v in meta.items():
            if k not in RESERVED and _scalar(v):
                row[k] = v
        return {
            "pixels": self.pixels(s["image"]),
            "key": s["key"],
            "thumb": make_thumbnail(s["image"], self.thumb_size) if self.thumb_size > 0 else b"",
            "row": row,
        }


def embed_shard(
    url: str,
    parts_dir: Path,
    model: ClipModel,
    settings: EmbedSettings,
    batch_size: int = 64,
    workers: int = 1,
    progress: Any = None,
) -> dict[str, Any]:
    """Embed one shard into a part (or reuse a complete matching part). Returns the part's JSON record."""
    stem = part_stem(url)
    done = parts_dir / f"{stem}.json"
    if done.exists():
        rec = json.loads(done.read_text())
        # the record is a file: reuse it only for this very shard (never take a URL from it)
        if rec.get("url") == url and settings.matches(rec.get("settings", {})):
            log.info("part %s complete: %d rows (skipped)", stem, rec["count"])
            if progress is not None:
                progress.update(rec["count"])
            return rec
        log.info("part %s was made with other settings: rebuilding", stem)
    t0 = time.perf_counter()
    report = BadSampleReport()
    emb = encode.RowBuffer(np.float16)
    rows: list[dict[str, Any]] = []
    thumbs: list[bytes] = []
    batches = encode.encode_shards(
        model, [url], prepare=IndexPrepare(model.preprocess, settings.thumb_size, url),
        decode=DecodeConfig(image=True, caption=False), batch_size=batch_size, workers=workers,
        split="sample", report=report, prefetch=2, limit=settings.max_per_shard,
    )  # fmt: skip
    for b in batches:
        if not b.keys:
            continue
        emb.append(b.emb)  # float32 -> float16 on copy into the part's buffer
        rows.extend(b.fields["row"])
        thumbs.extend(b.fields["thumb"])
        if progress is not None:
            progress.update(len(b))
    arr = emb.array(int(model.config.embed_dim))
    write_part(parts_dir, stem, arr, rows, thumbs)
    rec = {
        "url": url,
        "shard": shard_name(url),
        "stem": stem,
        "count": len(rows),
        "dim": int(arr.shape[1]),
        "bad": report.to_dict(),
        "seconds": round(time.perf_counter() - t0, 3),
        "settings": asdict(settings),
    }
    write_json(done, rec)
    log.info("part %s: %d rows, %d bad (%s)", stem, len(rows), report.total, report.summary())
    return rec


def write_part(parts_dir: Path, stem: str, emb: np.ndarray, rows: list[dict], thumbs: list[bytes]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(parts_dir / f"{stem}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, emb)
    table = rows_to_table(rows).append_column("thumb", pa.array(thumbs, type=pa.binary()))
    with atomic_path(parts_dir / f"{stem}.parquet") as tmp:
        pq.write_table(table, tmp)


def rows_to_table(rows: list[dict[str, Any]]) -> Any:
    """Rows with possibly different metadata fields -> one Arrow table (missing fields are null).

    A metadata field whose type differs between rows (an id that is an int here and a string there)
    is stored as string rather than failing the build.
    """
    import pyarrow as pa

    names: list[str] = []
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    for k in ("key", "shard", "source", "caption", "captions", "label"):
        if k not in names:
            names.append(k)
    cols = {}
    fixed = {
        "key": pa.string(),
        "shard": pa.string(),
        "source": pa.string(),
        "caption": pa.string(),
        "captions": pa.list_(pa.string()),
        "label": pa.int64(),
    }
    for k in names:
        vals = [r.get(k) for r in rows]
        if k in fixed:
            cols[k] = pa.array(vals, type=fixed[k])
            continue
        try:
            cols[k] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            cols[k] = pa.array([None if v is None else str(v) for v in vals], type=pa.string())
    return pa.table(cols)
