"""Ingest raw image-text pairs into webdataset shards (+ per-shard Parquet side tables).

Inputs: (a) a folder of images with same-name ``.txt`` captions, (b) a CSV/TSV/Parquet/JSONL table with
an image path-or-URL column and a caption column, (c) existing shards (re-shard), or (d) the retry list
of an earlier run (``retry.jsonl``: the URLs that failed for transient reasons, with their keys).

Every image is fully decoded once on ingest, so bad bytes never reach a shard; optional resize (longer
side <= N, or shortest side to S as img2dataset's ``keep_ratio``: :mod:`clipforge.data.resize`)
re-encodes as JPEG. Output in ``OUTPUT/``: ``PREFIX-000000.tar`` + ``.parquet`` ...,
``bad_samples.json`` (key + reason of every skipped sample), ``retry.jsonl`` (transient URL failures;
feed it back with ``--retry-from``) and ``ingest_stats.json``. A retry run appends new shards after the
existing ones and keeps the original keys, writing ``bad_samples.retryN.json``/``ingest_stats.retryN.json``.
Keys are the 9-digit input row number (re-shard keeps the source keys), so reruns are reproducible.

Tables and folders are untrusted (issue 11.10, 11.14): a row that cannot be parsed (a cell over
``max_cell_chars``, a line over ``max_line_chars``, bad UTF-8, bad JSON, wrong field count) costs that
row only and is reported under its key; local paths (folder files, table path cells, their caption
files) must resolve, symlinks followed, to a regular file inside ``root`` (default: the folder, or the
table's folder; ``--root DIR`` to widen, ``--no-confine`` for a trusted table) or they are reported as
``outside_root``; files over the image/caption caps are not read. The output directory follows
:func:`clipforge.utils.prepare_output_dir` (a previous result is refused unless ``--overwrite``;
``--retry-from`` continues the same output).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.decode import (
    DECODE_BUDGET,
    IMAGE_EXTS,
    TEXT_EXTS,
    DecodeConfig,
    SkipSample,
    decode_image,
    decode_sample,
    decode_text,
)
from clipforge.data.fetch import FetchConfig, Fetcher, is_retryable
from clipforge.data.keys import printable
from clipforge.data.parallel import ordered_map
from clipforge.data.reader import ReadLimits, iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.resize import plan_resize
from clipforge.data.shards import expand_shards
from clipforge.data.tables import TABLE_EXTS, BadRow, read_table_rows
from clipforge.data.writer import ShardWriter
from clipforge.utils import atomic_path, prepare_output_dir, write_json

log = logging.getLogger(__name__)

FOLDER_IMAGE_EXTS = {f".{e}" for e in IMAGE_EXTS}
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class IngestConfig:
    output: Path
    prefix: str = "shard"
    maxcount: int = 10_000
    maxsize: float = 1e9
    max_side: int | None = None  # resize so the longer side is at most this (re-encodes as JPEG)
    shortest_side: int | None = None  # or: shortest side to this, no crop (img2dataset keep_ratio)
    only_if_bigger: bool = False  # shortest_side: never upsample (img2dataset resize_only_if_bigger)
    draft: bool = True  # shrinking JPEGs: let libjpeg decode at 1/2..1/8 first (False: full decode)
    quality: int = 95  # JPEG quality when re-encoding
    workers: int = 16  # threads: downloads and Pillow decode both release the GIL
    image_column: str = "url"
    caption_column: str = "caption"
    max_caption_chars: int = 10_000
    fetch: FetchConfig = field(default_factory=FetchConfig)
    root: Path | None = None  # local files must lie inside (default: the folder / the table's folder)
    confine: bool = True  # False: trust every local path (a table you wrote yourself)
    overwrite: bool = False  # replace a previous result in ``output``
    limits: ReadLimits = field(default_factory=ReadLimits.from_env)  # image/caption file caps too
    max_cell_chars: int = 1 << 20  # a table cell longer than this costs its row


@dataclass
class Record:
    """One input pair before loading: where the image is, its caption (or where to read it)."""

    key: str
    source: str  # local path, URL, or "shard/key"
    caption: str | None = None
    caption_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] | None = None  # re-shard: the raw sample
    error: SkipSample | None = None  # an input row that could not be read: reported under ``key``


# -- inputs -------------------------------------------------------------------------------------------
def records_from_folder(folder: str | Path) -> Iterator[Record]:
    """Images under ``folder`` (recursive, sorted) with captions from ``same-name.txt``."""
    root = Path(folder)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in FOLDER_IMAGE_EXTS and p.is_file())
    for i, p in enumerate(images):
        yield Record(key=f"{i:09d}", source=str(p), caption_path=str(p.with_suffix(".txt")))


def records_from_table(
    path: str | Path,
    image_column: str = "url",
    caption_column: str = "caption",
    max_cell_chars: int = 1 << 20,
) -> Iterator[Record]:
    """Rows with an image path-or-URL and a caption; relative paths resolve against the table's folder.

    A row that could not be read becomes a Record carrying its error (it keeps its key/row number).
    """
    base = Path(path).parent
    checked = False
    for i, row in enumerate(read_table_rows(path, max_cell_chars=max_cell_chars)):
        key = f"{i:09d}"
        if isinstance(row, BadRow):
            yield Record(key=key, source=f"{path}:row {i}", error=SkipSample(row.reason, row.detail))
            continue
        if not checked:
            missing = [c for c in (image_column, caption_column) if c not in row]
            if missing:
                raise ValueError(
                    f"{path}: no column(s) {missing}; columns are {list(row)} "
                    "(set --image-column / --caption-column)"
                )
            checked = True
        src = row.get(image_column)
        src = "" if src is None else str(src)
        if src and not re.match(r"^[a-z][a-z0-9+.-]*://", src) and not os.path.isabs(src):
            src = str(base / src)
        cap = row.get(caption_column)
        extra = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
        yield Record(key=key, source=src, caption=None if cap is None else str(cap), extra=extra)


def records_from_retry(path: str | Path) -> Iterator[Record]:
    """A ``retry.jsonl`` written by an earlier run: same keys, same captions. Only http(s) sources are
    taken from it (a retry list never names a local file); a malformed entry is reported, not fatal."""
    for n, row in enumerate(read_table_rows(Path(path))):
        if isinstance(row, BadRow):
            yield Record(key=f"retry-{n}", source=str(path), error=SkipSample(row.reason, row.detail))
            continue
        key, source, cap = row.get("key"), row.get("source"), row.get("caption")
        if not isinstance(key, str) or not isinstance(source, str) or not _is_url(source):
            yield Record(
                key=f"retry-{n}",
                source=str(path),
                error=SkipSample("bad_retry_row", printable(json.dumps(row, default=str), 200)),
            )
            continue
        extra = row.get("extra") if isinstance(row.get("extra"), dict) else {}
        yield Record(key=key, source=source, caption=cap if isinstance(cap, str) else None, extra=extra)


def records_from_shards(
    specs: Iterable[str], report: BadSampleReport, limits: ReadLimits | None = None
) -> Iterator[Record]:
    """Samples of existing shards; unsafe keys, oversized members... are reported by the reader."""
    for url in expand_shards(list(specs)):
        for raw in iter_tar_samples(url, report, limits):
            yield Record(key=raw["__key__"], source=f"{raw['__shard__']}/{raw['__key__']}", raw=raw)


def detect_kind(inputs: list[str]) -> str:
    """folder | table | shards, from what the inputs look like."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        has_tar = any(Path(inputs[0]).glob("*.tar"))
        has_img = any(p.suffix.lower() in FOLDER_IMAGE_EXTS for p in Path(inputs[0]).rglob("*"))
        return "shards" if has_tar and not has_img else "folder"
    if len(inputs) == 1 and inputs[0].lower().endswith(TABLE_EXTS):
        return "table"
    return "shards"


# -- per-record work (runs in the thread pool) ----------------------------------------------------------
def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def prepare_image(
    data: bytes,
    max_side: int | None,
    quality: int,
    shortest_side: int | None = None,
    only_if_bigger: bool = False,
    draft: bool = True,
) -> tuple[str, bytes, dict[str, int]]:
    """Validate (full decode) and optionally resize: -> (ext, stored bytes, size info).

    Resize rules (:mod:`clipforge.data.resize`): ``max_side`` shrinks so the longer side fits;
    ``shortest_side`` scales the shortest side to S like img2dataset's ``keep_ratio`` (upsampling small
    images unless ``only_if_bigger``). A resized image is re-encoded as JPEG. ``draft``: a JPEG being
    shrunk is decoded by libjpeg at 1/2..1/8 scale (sides kept >= the target) before the filter -- far
    less decode work; ``False`` decodes at full size (pixels then within ~1/255 mean of img2dataset's
    cv2 ``INTER_AREA``, ~2.5/255 with draft). Raises SkipSample
    (empty_image, corrupt_image, decompression_bomb; resize_too_large when an upsampled output would
    exceed Pillow's pixel limit, e.g. a 1-pixel-high strip) for unusable bytes. The pixels really
    decoded (after JPEG draft) or produced, whichever is more, are held in :data:`DECODE_BUDGET` over
    decode, resize and re-encode, so concurrent large images cannot add up (issue 11.15).
    """
    if not data:
        raise SkipSample("empty_image")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only: format and size
            fmt, (ow, oh) = probe.format, probe.size
            plan = plan_resize(ow, oh, max_side, shortest_side, only_if_bigger)
            draft_size = min(plan.size) if draft and plan.size is not None and plan.shrinks else None
            if draft_size and fmt == "JPEG":
                probe.draft("RGB", (draft_size, draft_size))  # what decode_image will decode
            pixels = probe.width * probe.height
    except Image.DecompressionBombError as e:
        raise SkipSample("decompression_bomb", str(e)[:200]) from None
    except Exception as e:
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {str(e)[:200]}") from None
    if plan.size is not None:
        out_pixels = plan.size[0] * plan.size[1]
        limit = Image.MAX_IMAGE_PIXELS
        if limit and out_pixels > limit:
            raise SkipSample(
                "resize_too_large", f"{ow}x{oh} -> {plan.size[0]}x{plan.size[1]} > {limit} pixels"
            )
        pixels = max(pixels, out_pixels)
    with DECODE_BUDGET.hold(pixels):
        img = decode_image(data, draft_size=draft_size)  # full decode validates
        if plan.size is not None:
            img = img.resize(plan.size, plan.resample)
            ext, out = "jpg", _encode_jpeg(img, quality)
        elif fmt in _FORMAT_EXT:
            ext, out = _FORMAT_EXT[fmt], data  # valid and needs no resize: keep the original bytes
        else:  # GIF/BMP/TIFF...: store as JPEG so every reader downstream handles it
            ext, out = "jpg", _encode_jpeg(img, quality)
        size = {"width": img.width, "height": img.height, "original_width": ow, "original_height": oh}
        del img  # freed inside the hold, so the budget's trim gives its pages back
    return ext, out, size


def read_local(path: str, root: str | None, cap: int, missing: str) -> bytes | None:
    """Bytes of a local file, or None when it does not exist.

    With ``root`` (a real path) the file must resolve, symlinks followed, inside it (``outside_root``);
    it must be a regular file (not a FIFO or device: ``not_a_file``) of at most ``cap`` bytes
    (``file_too_large``, checked before reading). ``missing`` is the reason for unreadable files.
    """
    real = os.path.realpath(path)
    if root is not None and real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise SkipSample("outside_root", f"{printable(path)} resolves outside --root {root}")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SkipSample(missing, f"{type(e).__name__}: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SkipSample("not_a_file", f"{printable(path)} is not a regular file")
    if st.st_size > cap:
        raise SkipSample("file_too_large", f"{printable(path)}: {st.st_size} bytes > cap {cap}")
    try:
        with open(real, "rb") as f:
            data = f.read(st.st_size + 1)  # not cap + 1: read(n) allocates n bytes up front
    except OSError as e:
        raise SkipSample(missing, f"{type(e).__name__}: {e}") from None
    if len(data) > st.st_size:  # grew after stat: read no further than the cap
        with open(real, "rb") as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            raise SkipSample("file_too_large", f"{printable(path)}: > cap {cap} bytes")
    return data


class Processor:
    """Turns a Record into a shard sample (dict for ShardWriter) or raises SkipSample."""

    def __init__(self, cfg: IngestConfig, root: str | Path | None = None) -> None:
        if cfg.max_side and cfg.shortest_side:
            raise ValueError("give --max-side or --shortest-side, not both")
        self.cfg = cfg
        self.fetcher = Fetcher(cfg.fetch, pool_size=max(cfg.workers, 4))
        self.root = os.path.realpath(root) if root is not None and cfg.confine else None

    def _prepare(self, data: bytes) -> tuple[str, bytes, dict[str, int]]:
        c = self.cfg
        return prepare_image(data, c.max_side, c.quality, c.shortest_side, c.only_if_bigger, c.draft)

    def load_bytes(self, rec: Record) -> bytes:
        if _is_url(rec.source):
            return self.fetcher.fetch(rec.source)
        if not rec.source:
            raise SkipSample("missing_image", "empty image path/URL")
        data = read_local(rec.source, self.root, self.cfg.limits.max_image_bytes, "missing_image")
        if data is None:
            raise SkipSample("missing_image", f"FileNotFoundError: {printable(rec.source)}")
        return data

    def __call__(self, rec: Record) -> dict[str, Any]:
        if rec.error is not None:
            raise rec.error
        if rec.raw is not None:
            return self._reshard(rec)
        if rec.caption is None and rec.caption_path is not None:
            raw_caption = read_local(
                rec.caption_path, self.root, self.cfg.limits.max_text_bytes, "missing_caption"
            )
        else:
            raw_caption = None if rec.caption is None else rec.caption.encode("utf-8", "surrogateescape")
        caption = decode_text(raw_caption, self.cfg.max_caption_chars)  # cheap checks before any download
        data = self.load_bytes(rec)
        ext, stored, size = self._prepare(data)
        meta = {"key": rec.key, "caption": caption, "source": rec.source, **size, **_jsonable(rec.extra)}
        return {
            "__key__": rec.key,
            "__source__": rec.source,
            "__width__": size["width"],
            "__height__": size["height"],
            ext: stored,
            "txt": caption,
            "json": meta,
        }

    def _reshard(self, rec: Record) -> dict[str, Any]:
        raw = rec.raw
        assert raw is not None
        decoded = decode_sample(raw, DecodeConfig(max_caption_chars=self.cfg.max_caption_chars))
        img_ext = next(e for e in IMAGE_EXTS if e in raw)
        ext, stored, size = self._prepare(raw[img_ext])
        out = {k: v for k, v in raw.items() if not k.startswith("__") and k not in IMAGE_EXTS}
        out.update(
            {
                "__key__": rec.key,
                "__source__": rec.source,
                "__width__": size["width"],
                "__height__": size["height"],
                ext: stored,
            }
        )
        if not any(e in out for e in TEXT_EXTS):
            out["txt"] = decoded["caption"]
        if ext != img_ext or stored is not raw[img_ext]:  # resized: record the new size in KEY.json
            out["json"] = {**decoded["meta"], **size}
        return out


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = str(v)
    return out


# -- driver -------------------------------------------------------------------------------------------
def _next_shard_index(output: Path, prefix: str) -> int:
    nums = [
        int(m.group(1))
        for p in output.glob(f"{prefix}-*.tar")
        if (m := re.match(rf"{re.escape(prefix)}-(\d+)\.tar$", p.name))
    ]
    return max(nums) + 1 if nums else 0


def _free_name(output: Path, stem: str) -> str:
    k = 1
    while (output / f"{stem}.retry{k}.json").exists():
        k += 1
    return f"{stem}.retry{k}.json"


def _check_not_inside(inputs: list[str], out: Path) -> None:
    """--overwrite replaces ``out``: never when an input lives inside it."""
    real_out = os.path.realpath(out)
    for i in inputs:
        if os.path.exists(i):
            real = os.path.realpath(i)
            if real == real_out or real.startswith(real_out + os.sep):
                raise ValueError(f"input {i} is inside --output {out}: choose another output directory")


def _window(cfg: IngestConfig) -> int:
    """Items in flight: resized results are small, so keep 32 per worker queued behind a slow URL (one
    timing out at the head no longer idles the pool); unresized ones carry whole files, so 4."""
    return (32 if cfg.max_side or cfg.shortest_side else 4) * max(1, cfg.workers)


def ingest(
    inputs: list[str],
    cfg: IngestConfig,
    kind: str = "auto",
    retry_from: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run an ingest; returns the stats dict (also saved as ``ingest_stats.json``)."""
    from tqdm import tqdm

    if cfg.max_side and cfg.shortest_side:  # before the output directory is touched
        raise ValueError("give --max-side or --shortest-side, not both")
    out = Path(cfg.output)
    report = BadSampleReport()
    root: str | Path | None = cfg.root
    if retry_from:
        kind = "retry"
        records: Iterable[Record] = list(records_from_retry(retry_from))  # read fully: may be OUT/retry.jsonl
        prepare_output_dir(out, resume=True)  # a retry run appends to its own earlier output
    else:
        if not inputs:
            raise ValueError("give INPUT (folder, table, or shards) or --retry-from FILE")
        _check_not_inside(inputs, out)
        kind = detect_kind(inputs) if kind == "auto" else kind
        prepare_output_dir(out, overwrite=cfg.overwrite)
        if kind == "folder":
            root = root or inputs[0]
            records = records_from_folder(inputs[0])
        elif kind == "table":
            root = root or Path(inputs[0]).parent
            records = records_from_table(inputs[0], cfg.image_column, cfg.caption_column, cfg.max_cell_chars)
        elif kind == "shards":
            records = records_from_shards(inputs, report, cfg.limits)
        else:
            raise ValueError(f"unknown input kind {kind!r}")
    existing = _next_shard_index(out, cfg.prefix)
    log.info("ingest %s -> %s", kind, out)
    proc = Processor(cfg, root)
    retry: list[dict[str, Any]] = []
    ok = 0
    bar = tqdm(desc=f"ingest {kind}", unit="img", disable=not progress, file=None, dynamic_ncols=True)
    with ShardWriter(
        output_dir=out,
        prefix=cfg.prefix,
        maxcount=cfg.maxcount,
        maxsize=cfg.maxsize,
        start_shard=existing if retry_from else 0,
    ) as writer:
        for rec, result in ordered_map(proc, records, cfg.workers, window=_window(cfg)):
            bar.update(1)
            if isinstance(result, SkipSample):
                report.add(rec.key, result.reason, printable(f"{rec.source}: {result.detail}", 300))
                if _is_url(rec.source) and is_retryable(result.reason):
                    retry.append(
                        {
                            "key": rec.key,
                            "source": rec.source,
                            "caption": rec.caption,
                            "extra": _jsonable(rec.extra),
                            "reason": result.reason,
                        }
                    )
            else:
                try:
                    writer.write(result)
                    ok += 1
                except ValueError as e:  # duplicate key in re-shard input, unusable key
                    reason = "duplicate_key" if "duplicate" in str(e) else "bad_key"
                    report.add(rec.key, reason, str(e)[:200])
            bar.set_postfix(ok=ok, bad=report.total, retry=len(retry), refresh=False)
    bar.close()
    with atomic_path(out / "retry.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in retry))
    report_name = _free_name(out, "bad_samples") if retry_from else "bad_samples.json"
    stats_name = _free_name(out, "ingest_stats") if retry_from else "ingest_stats.json"
    write_json(out / report_name, report.to_dict())
    stats = {
        "kind": kind,
        "output": str(out),
        "written": ok,
        "skipped": report.total,
        "skipped_by_reason": dict(Counter(report.counts).most_common()),
        "retry_list": str(out / "retry.jsonl"),
        "retry_count": len(retry),
        "shards": [Path(s).name for s in writer.shards],
        "bad_samples": str(out / report_name),
    }
    write_json(out / stats_name, stats)
    return stats
