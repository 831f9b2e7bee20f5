"""One shard -> its score table: read it as columnar batches, run the sample stages, write atomically.

Both engines call :func:`process_shard` (the local thread pool in :mod:`clipforge.curate.engine`, the
Ray actors in :mod:`clipforge.curate.ray_engine`), so a shard scored by either is the same file.

Per shard ``STEM`` of the input, under ``OUT/shards/``::

    STEM.parquet      one row per sample key (sample-stage columns); its metadata lists the stages held
    STEM.image.npy    float16 [rows, D] image embeddings (clip-score), NaN = no image
    STEM.text.npy     float16 [rows, D] caption embeddings
    STEM.copy.npy     float16 [rows, F] copy-detection descriptors (copy stage), NaN = no image
    STEM.copyaug.npy  float16 [rows, F] descriptors of synthetic copies (calibration rows only, else NaN)

Resume: the Parquet is written atomically *after* its embeddings, and records the stages it holds; a
rerun skips a shard whose table has every requested stage and, for a table missing some stage, runs
only the missing ones (the existing columns are passed in, nothing is rescored).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.curate.registry import Batch, Context, Stage
from clipforge.data.decode import IMAGE_EXTS
from clipforge.data.fields import sample_fields
from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import is_remote, shard_name
from clipforge.utils import atomic_path

META_KEY = b"clipforge.curate"
EMB_COLUMNS = {
    "__emb_image__": "image",
    "__emb_text__": "text",
    "__emb_copy__": "copy",  # copy stage: raw pre-head descriptors (curate/copydetect.py)
    "__emb_copyaug__": "copyaug",  # copy stage: descriptors of the synthetic calibration copies
}
EMB_NAMES = tuple(EMB_COLUMNS.values())
# Types for columns that can be all-null in one shard (so per-shard tables concatenate cleanly).
COLUMN_TYPES = {
    "key": pa.string(),
    "shard": pa.string(),
    "caption": pa.string(),
    "caption_error": pa.string(),
    "lang": pa.string(),
    "lang_score": pa.float64(),
    "image_format": pa.string(),
    "image_error": pa.string(),
    "sha256": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "aspect": pa.float64(),
    "pixel_std": pa.float64(),
    "dominant_frac": pa.float64(),
    "is_blank": pa.bool_(),
    "phash": pa.int64(),
    "dhash": pa.int64(),
    "copy_calib_kind": pa.string(),
    "copy_calib_phash": pa.int64(),
    "clip_score": pa.float64(),
    "nsfw_score": pa.float64(),
    "violence_score": pa.float64(),
    "unsafe_score": pa.float64(),
    "exact_dup_of": pa.string(),
    "near_dup_of": pa.string(),
    "semantic_dup_of": pa.string(),
    "semantic_max_sim": pa.float64(),
    "copy_dup_of": pa.string(),
    "copy_max_sim": pa.float64(),
    "dup_of": pa.string(),
    "eval_dup_of": pa.string(),
    "eval_sim": pa.float64(),
    "eval_copy_sim": pa.float64(),
    "eval_phash_dist": pa.int64(),
}


def shard_stem(url: str) -> str:
    name = shard_name(url)
    return name[: -len(".tar")] if name.endswith(".tar") else name.replace("/", "_").replace(":", "_")


def to_table(cols: dict[str, list]) -> pa.Table:
    return pa.table({c: pa.array(v, type=COLUMN_TYPES.get(c)) for c, v in cols.items()})


# -- reading a shard as columnar batches ---------------------------------------------------------
def iter_batches(url: str, batch_size: int, report: BadSampleReport) -> Iterator[Batch]:
    """Columnar batches of one shard in file order. Every key gets a row, even with a bad part."""
    batch: Batch = _empty_batch()
    for s in iter_tar_samples(url, report):
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        fields = sample_fields(s, label=False)  # the one caption rule (clipforge.data.fields)
        for e in fields.errors.values():  # a bad KEY.json or caption: reported by key, the row stays
            report.add(s["__key__"], e.reason, e.detail)
        err = fields.errors.get("caption")
        caption = fields.caption
        batch["key"].append(s["__key__"])
        batch["shard"].append(s["__shard__"])
        batch["image_bytes"].append(s[ext] if ext else None)
        batch["image_ext"].append(ext)
        batch["caption"].append(caption)
        batch["caption_error"].append(err.reason if err else None)
        if len(batch["key"]) >= batch_size:
            yield batch
            batch = _empty_batch()
    if batch["key"]:
        yield batch


def _empty_batch() -> Batch:
    return {k: [] for k in ("key", "shard", "image_bytes", "image_ext", "caption", "caption_error")}


# -- one shard -----------------------------------------------------------------------------------
def shard_paths(out_dir: Path, url: str) -> dict[str, Path]:
    stem = shard_stem(url)
    d = out_dir / "shards"
    return {"table": d / f"{stem}.parquet", **{n: d / f"{stem}.{n}.npy" for n in EMB_NAMES}}


def stages_done(
    table_path: Path, url: str | None = None, report: BadSampleReport | None = None
) -> list[str] | None:
    """The stages a finished shard table holds; None when there is none to resume from.

    A table that cannot be read, or that was scored from another shard of the same file name, is not
    resumed (the shard is scored again) and is recorded in ``report`` under its file name, never
    ignored silently.
    """
    if not table_path.exists():
        return None
    try:
        meta = json.loads((pq.read_schema(table_path).metadata or {})[META_KEY])
        stages, was = list(meta["stages"]), meta.get("url")
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        if report is not None:
            report.add(table_path.name, "unreadable_score_table", f"{type(e).__name__}: {str(e)[:200]}")
        return None
    if url is not None and was is not None and not same_shard(was, url):
        if report is not None:
            report.add(table_path.name, "stale_score_table", f"scored from {was[:200]}, now {url[:200]}")
        return None
    if url is not None and meta.get("source") and meta["source"] != source_stat(url):
        if report is not None:
            report.add(table_path.name, "stale_score_table", f"{url[:200]} was rewritten since it was scored")
        return None
    return stages


def source_stat(url: str) -> dict[str, int] | None:
    """Size and mtime of a local shard (a rewritten shard is not resumed from its old table)."""
    if is_remote(url):
        return None
    try:
        st = os.stat(url)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_shard(a: str, b: str) -> bool:
    """Two specs of one shard (a relative and an absolute path of one local file are the same)."""
    if a == b:
        return True
    if is_remote(a) or is_remote(b):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


class StaleTable(Exception):
    """A saved shard table no longer matches its shard (the shard was rewritten since)."""


def process_shard(url: str, stages: list[Stage], ctx: Context, out_dir: Path) -> dict[str, Any]:
    """Score one shard with the sample stages it still lacks; write its table (+ embeddings) atomically.

    A table that does not match the shard any more (keys or row count changed) is not an error that
    stops the run: the shard is scored again, whole, and the case is reported (``stale_score_table``).
    """
    paths = shard_paths(out_dir, url)
    report = BadSampleReport()
    done = stages_done(paths["table"], url, report) or []
    todo = [s for s in stages if s.name not in done]
    if not todo:
        return {"url": url, "status": "done", "rows": pq.read_metadata(paths["table"]).num_rows, "bad": {}}
    t0 = time.perf_counter()
    source = source_stat(url)  # before reading: a shard rewritten while it is scored is rescored next time
    try:
        table, embs = score_shard(url, todo, ctx, report, saved_scores(paths) if done else None)
    except StaleTable as e:
        report = BadSampleReport()  # the partial pass's records would count twice
        report.add(paths["table"].name, "stale_score_table", str(e))
        done, todo = [], list(stages)
        table, embs = score_shard(url, todo, ctx, report, None)
    if not done:  # scored from scratch: embeddings of an earlier table must not outlive it
        for n in EMB_NAMES:
            paths[n].unlink(missing_ok=True)
    meta = {
        "stages": [*done, *(s.name for s in todo)],
        "url": url,
        "source": source,
        "bad": report.to_dict()["counts"],
    }
    write_shard_scores(paths, table, embs, meta)
    return {
        "url": url,
        "status": "scored",
        "rows": table.num_rows,
        "seconds": time.perf_counter() - t0,
        "bad": report.to_dict(),
    }


def saved_scores(paths: dict[str, Path]) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """A finished table and its embeddings (memory-mapped): the inputs of the stages still to run."""
    embs = {n: np.load(paths[n], mmap_mode="r") for n in EMB_NAMES if paths[n].exists()}
    return pq.read_table(paths["table"]), embs


def score_shard(
    url: str,
    todo: list[Stage],
    ctx: Context,
    report: BadSampleReport,
    saved: tuple[pa.Table, dict[str, np.ndarray]] | None,
) -> tuple[pa.Table, dict[str, list[np.ndarray]]]:
    """Run ``todo`` over the shard's batches; with ``saved``, its columns are inputs and kept as they are."""
    old, old_emb = saved if saved is not None else (None, {})
    cols: dict[str, list] = {}
    embs: dict[str, list[np.ndarray]] = {}
    row = 0
    for batch in iter_batches(url, ctx.config.batch_size, report):
        n = len(batch["key"])
        if old is not None:  # earlier stages' columns are inputs to the missing ones
            part = old.slice(row, n)
            if part.column("key").to_pylist() != batch["key"]:
                raise StaleTable(f"keys differ from row {row} on")
            for c in part.column_names:
                batch.setdefault(c, part.column(c).to_pylist())
            for name, arr in old_emb.items():  # reuse saved embeddings: never re-run the model
                batch[f"__emb_{name}__"] = np.asarray(arr[row : row + n], dtype=np.float32)
        for key in ("key", "shard", "caption", "caption_error"):
            cols.setdefault(key, []).extend(batch[key])
        for stage in todo:
            run_stage(stage, batch, ctx, n, cols, embs)
        row += n
    if old is None:
        return to_table(cols or {k: [] for k in ("key", "shard", "caption", "caption_error")}), embs
    if row != old.num_rows:
        raise StaleTable(f"the table has {old.num_rows} rows, the shard now {row}")
    table = old
    for c, v in cols.items():
        if c not in table.column_names:
            table = table.append_column(c, pa.array(v, type=COLUMN_TYPES.get(c)))
    return table, embs


def run_stage(
    stage: Stage, batch: Batch, ctx: Context, n: int, cols: dict[str, list], embs: dict[str, list]
) -> None:
    """One stage on one batch: its columns go to ``cols`` (and into the batch for later stages)."""
    for c, v in stage.fn(batch, ctx).items():
        if c in EMB_COLUMNS:
            embs.setdefault(EMB_COLUMNS[c], []).append(np.asarray(v, dtype=np.float16))
            batch[c] = v
            continue
        if len(v) != n:
            raise RuntimeError(f"stage {stage.name} returned {len(v)} values for column {c}, batch has {n}")
        cols.setdefault(c, []).extend(v)
        batch[c] = v


def write_shard_scores(
    paths: dict[str, Path], table: pa.Table, embs: dict[str, list[np.ndarray]], meta: dict[str, Any]
) -> None:
    """Embeddings first, then the table: a visible table implies its embeddings exist (resume relies on it)."""
    for name, parts in embs.items():
        with atomic_path(paths[name]) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate(parts))
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    paths["table"].parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths["table"]) as tmp:
        pq.write_table(table, tmp)
