"""The local curation engine: score shards into per-shard Parquet, then run global stages and merge.

Output layout of ``clipforge curate run --output OUT``::

    OUT/manifest.json               inputs, stages, config, per-shard status, bad-sample counts
    OUT/shards/STEM.parquet         one row per sample key of input shard STEM (sample-stage columns)
    OUT/shards/STEM.image.npy       float16 [rows, D] image embeddings (clip-score), NaN = no image
    OUT/shards/STEM.text.npy        float16 [rows, D] caption embeddings
    OUT/global/dedup.parquet ...    global-stage columns (key + columns) and their stats JSON
    OUT/scores.parquet              everything joined: the table filters and reports read
    OUT/eval/...                    the eval set's own scores (dedup against an eval set)

Resume: each shard's Parquet is written atomically *after* its embeddings, and it records the stages it
holds in its metadata; a rerun skips shards whose table has every requested stage and, for a table
missing some stage, runs only the missing ones (the existing columns are passed in, nothing is
rescored). Memory is bounded by ``batch_size`` images per worker plus the small per-shard columns.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.curate.stages import Batch, Context, CurateConfig, Stage, resolve_stages
from clipforge.data.decode import IMAGE_EXTS, TEXT_EXTS, SkipSample, decode_text
from clipforge.data.reader import iter_tar_samples
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards, shard_name
from clipforge.utils import atomic_path, write_json

log = logging.getLogger(__name__)

META_KEY = b"clipforge.curate"
EMB_COLUMNS = {"__emb_image__": "image", "__emb_text__": "text"}
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
    "clip_score": pa.float64(),
    "nsfw_score": pa.float64(),
    "violence_score": pa.float64(),
    "unsafe_score": pa.float64(),
    "exact_dup_of": pa.string(),
    "near_dup_of": pa.string(),
    "semantic_dup_of": pa.string(),
    "semantic_max_sim": pa.float64(),
    "dup_of": pa.string(),
    "eval_dup_of": pa.string(),
    "eval_sim": pa.float64(),
    "eval_phash_dist": pa.int64(),
}


def shard_stem(url: str) -> str:
    name = shard_name(url)
    return name[: -len(".tar")] if name.endswith(".tar") else name.replace("/", "_").replace(":", "_")


def to_table(cols: dict[str, list]) -> pa.Table:
    return pa.table({c: pa.array(v, type=COLUMN_TYPES.get(c)) for c, v in cols.items()})


# -- reading a shard as columnar batches ---------------------------------------------------------
def raw_caption(sample: dict[str, Any]) -> bytes | None:
    raw = next((sample[e] for e in TEXT_EXTS if e in sample), None)
    if raw is None and "json" in sample:
        try:
            caps = json.loads(sample["json"].decode("utf-8")).get("captions")
            if isinstance(caps, list) and caps:
                raw = str(caps[0]).encode("utf-8")
        except Exception:
            pass
    return raw


def iter_batches(url: str, batch_size: int, report: BadSampleReport) -> Iterator[Batch]:
    """Columnar batches of one shard in file order. Every key gets a row, even with a bad part."""
    batch: Batch = _empty_batch()
    for s in iter_tar_samples(url, report):
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        try:
            caption, err = decode_text(raw_caption(s)), None
        except SkipSample as e:
            caption, err = None, e.reason
            report.add(s["__key__"], e.reason, e.detail)
        batch["key"].append(s["__key__"])
        batch["shard"].append(s["__shard__"])
        batch["image_bytes"].append(s[ext] if ext else None)
        batch["image_ext"].append(ext)
        batch["caption"].append(caption)
        batch["caption_error"].append(err)
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
    return {"table": d / f"{stem}.parquet", "image": d / f"{stem}.image.npy", "text": d / f"{stem}.text.npy"}


def stages_done(table_path: Path) -> list[str] | None:
    """The stages a finished shard table holds, or None when there is no (readable) table."""
    if not table_path.exists():
        return None
    try:
        meta = pq.read_schema(table_path).metadata or {}
        return list(json.loads(meta[META_KEY])["stages"])
    except Exception:
        return None


def process_shard(url: str, stages: list[Stage], ctx: Context, out_dir: Path) -> dict[str, Any]:
    """Score one shard with the sample stages it still lacks; write its table (+ embeddings) atomically."""
    paths = shard_paths(out_dir, url)
    done = stages_done(paths["table"]) or []
    todo = [s for s in stages if s.name not in done]
    if not todo:
        return {"url": url, "status": "done", "rows": pq.read_metadata(paths["table"]).num_rows, "bad": {}}
    old = pq.read_table(paths["table"]) if done else None
    old_emb = {
        n: np.load(paths[n], mmap_mode="r")
        for n in ("image", "text")
        if old is not None and paths[n].exists()
    }
    report = BadSampleReport()
    cols: dict[str, list] = {}
    embs: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    row = 0
    for batch in iter_batches(url, ctx.config.batch_size, report):
        n = len(batch["key"])
        if old is not None:  # earlier stages' columns are inputs to the missing ones
            part = old.slice(row, n)
            if part.column("key").to_pylist() != batch["key"]:
                raise RuntimeError(
                    f"{paths['table']} does not match shard {url} any more: delete it to rescore"
                )
            for c in part.column_names:
                batch.setdefault(c, part.column(c).to_pylist())
            for name, arr in old_emb.items():  # reuse saved embeddings: never re-run the model
                batch[f"__emb_{name}__"] = np.asarray(arr[row : row + n], dtype=np.float32)
        for key in ("key", "shard", "caption", "caption_error"):
            cols.setdefault(key, []).extend(batch[key])
        for stage in todo:
            new = stage.fn(batch, ctx)
            for c, v in new.items():
                if c in EMB_COLUMNS:
                    embs.setdefault(EMB_COLUMNS[c], []).append(np.asarray(v, dtype=np.float16))
                    batch[c] = v
                    continue
                if len(v) != n:
                    raise RuntimeError(
                        f"stage {stage.name} returned {len(v)} values for column {c}, batch has {n}"
                    )
                cols.setdefault(c, []).extend(v)
                batch[c] = v
        row += n
    if old is not None:
        if row != old.num_rows:
            raise RuntimeError(
                f"{paths['table']} has {old.num_rows} rows, shard {url} now has {row}: delete it"
            )
        table = old
        for c, v in cols.items():
            if c not in table.column_names:
                table = table.append_column(c, pa.array(v, type=COLUMN_TYPES.get(c)))
    else:
        table = (
            to_table(cols)
            if cols
            else to_table({k: [] for k in ("key", "shard", "caption", "caption_error")})
        )
    for name, parts in embs.items():  # embeddings first: a visible table implies its embeddings exist
        with atomic_path(paths[name]) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate(parts))
    meta = {"stages": [*done, *(s.name for s in todo)], "url": url, "bad": report.to_dict()["counts"]}
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    paths["table"].parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths["table"]) as tmp:
        pq.write_table(table, tmp)
    return {
        "url": url,
        "status": "scored",
        "rows": table.num_rows,
        "seconds": time.perf_counter() - t0,
        "bad": report.to_dict(),
    }


# -- the local engine ----------------------------------------------------------------------------
class _LockedContext(Context):
    """Context whose lazy caches are built once even when worker threads ask at the same time."""

    def __init__(self, config: CurateConfig, model: Any = None) -> None:
        super().__init__(config, model)
        self._lock = threading.RLock()

    @property
    def model(self) -> Any:
        with self._lock:
            return Context.model.fget(self)  # type: ignore[attr-defined]

    def cached(self, name: str, build: Any) -> Any:
        with self._lock:
            return super().cached(name, build)


def run_local(
    urls: list[str], stages: list[Stage], ctx: Context, out_dir: Path, workers: int = 1, progress: bool = True
) -> list[dict[str, Any]]:
    """Score shards with a thread pool (decode and torch release the GIL); one shard per task."""
    from tqdm import tqdm

    results = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futs = [pool.submit(process_shard, u, stages, ctx, out_dir) for u in urls]
        for f in tqdm(futs, desc="curate shards", unit="shard", disable=not progress):
            results.append(f.result())
    return results


# -- merging + global stages ---------------------------------------------------------------------
def load_scores(out_dir: Path, urls: list[str]) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """All per-shard tables in input order, and their embeddings (float16) where every shard has them."""
    tables, embs = [], {"image": [], "text": []}
    for u in urls:
        p = shard_paths(out_dir, u)
        t = pq.read_table(p["table"]).replace_schema_metadata(None)
        tables.append(t)
        for name in embs:
            if embs[name] is not None and p[name].exists():
                e = np.load(p[name], mmap_mode="r")
                if len(e) != t.num_rows:
                    raise RuntimeError(
                        f"{p[name]} has {len(e)} rows, its table {t.num_rows}: rescore that shard"
                    )
                embs[name].append(e)
            else:
                embs[name] = None  # type: ignore[assignment]
    table = pa.concat_tables(tables, promote_options="default")
    return table, {k: np.concatenate(v) for k, v in embs.items() if v}


def check_unique_keys(table: pa.Table) -> None:
    import pyarrow.compute as pc

    n_unique = pc.count_distinct(table.column("key")).as_py()
    if n_unique != table.num_rows:
        vc = pc.value_counts(table.column("key"))
        dups = [d["values"] for d in vc.to_pylist() if d["counts"] > 1][:5]
        raise ValueError(
            f"sample keys must be unique across the shard set ({table.num_rows - n_unique} repeats, e.g. {dups}); "
            "score tables are keyed by sample key"
        )


def run_global(
    stages: list[Stage],
    table: pa.Table,
    embs: dict[str, np.ndarray],
    ctx: Context,
    out_dir: Path,
    evalset: Any,
) -> tuple[pa.Table, dict[str, Any]]:
    """Run global stages on the merged table; save each one's columns and stats; return the joined table."""
    stats: dict[str, Any] = {}
    for stage in stages:
        t0 = time.perf_counter()
        cols = stage.fn(table, embs, ctx, evalset=evalset)
        st = cols.pop("__stats__", {})
        st["seconds"] = round(time.perf_counter() - t0, 3)
        stats[stage.name] = st
        if cols.pop("key") != table.column("key").to_pylist():
            raise RuntimeError(f"global stage {stage.name} changed the row order")
        gt = to_table({"key": table.column("key").to_pylist(), **cols})
        with atomic_path(out_dir / "global" / f"{stage.name}.parquet") as tmp:
            pq.write_table(gt, tmp)
        write_json(out_dir / "global" / f"{stage.name}.stats.json", st)
        for c in cols:
            col = gt.column(c)
            if c in table.column_names:
                table = table.set_column(table.column_names.index(c), c, col)
            else:
                table = table.append_column(c, col)
        log.info("global stage %s: %.1fs", stage.name, st["seconds"])
    return table, stats


def score_evalset(
    eval_specs: list[str], ctx: Context, out_dir: Path, engine: str, workers: int
) -> dict[str, Any]:
    """Image hashes and embeddings of the eval set (scored and cached like any shard set)."""
    urls = expand_shards(eval_specs)
    names = ["image"] + (["clip-score"] if ctx.config.model or ctx._model is not None else [])
    stages = [s for s in resolve_stages(names) if s.kind == "sample"]
    eval_dir = out_dir / "eval"
    run_local(urls, stages, ctx, eval_dir, workers=workers, progress=False)
    table, embs = load_scores(eval_dir, urls)
    return {
        "keys": table.column("key").to_pylist(),
        "phash": table.column("phash").to_pylist(),
        "emb": embs.get("image"),
    }


def run_curation(
    data: list[str] | str,
    out_dir: str | Path,
    config: CurateConfig,
    *,
    engine: str = "local",
    workers: int = 1,
    model: Any = None,
    eval_data: list[str] | None = None,
    dedup: Any = None,
    balance: Any = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a curation recipe end to end; returns the summary that ``--json`` prints."""
    out_dir = Path(out_dir)
    urls = expand_shards(data)
    stems = [shard_stem(u) for u in urls]
    if len(set(stems)) != len(stems):
        raise ValueError("two input shards have the same file name; score tables are named after shards")
    stages = resolve_stages(config.stages)
    sample_stages = [s for s in stages if s.kind == "sample"]
    global_stages = [s for s in stages if s.kind == "global"]
    ctx = _LockedContext(config, model)
    if dedup is not None:
        ctx._cache["dedup_config"] = dedup
    if balance is not None:
        ctx._cache["balance_config"] = balance
    manifest_path = out_dir / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if (
        old
        and old.get("config", {}).get("model") not in (None, config.model)
        and "clip-score" in config.stages
    ):
        log.warning(
            "output dir was scored with model %s, now %s: existing shards keep their scores",
            old["config"]["model"],
            config.model,
        )
    t0 = time.perf_counter()
    if engine == "local":
        results = run_local(urls, sample_stages, ctx, out_dir, workers, progress)
    elif engine == "ray":
        from clipforge.curate.ray_engine import run_ray

        results = run_ray(
            urls, sample_stages, config, out_dir, workers=workers, model=model, address=ray_address
        )
    else:
        raise ValueError(f"unknown engine {engine!r} (local | ray)")
    t_sample = time.perf_counter() - t0
    bad = BadSampleReport()
    for r in results:
        if r.get("bad"):
            bad.merge(r["bad"] if "counts" in r["bad"] else {"counts": r["bad"]})
    table, embs = load_scores(out_dir, urls)
    check_unique_keys(table)
    evalset = None
    if eval_data and any(s.name == "dedup" for s in global_stages):
        evalset = score_evalset(eval_data, ctx, out_dir, engine, workers)
    t1 = time.perf_counter()
    table, gstats = run_global(global_stages, table, embs, ctx, out_dir, evalset)
    t_global = time.perf_counter() - t1
    with atomic_path(out_dir / "scores.parquet") as tmp:
        pq.write_table(table, tmp)
    summary = {
        "output": str(out_dir),
        "engine": engine,
        "shards": len(urls),
        "shards_scored": sum(r["status"] == "scored" for r in results),
        "shards_resumed": sum(r["status"] == "done" for r in results),
        "rows": table.num_rows,
        "stages": [s.name for s in stages],
        "columns": [c for c in table.column_names],
        "bad_samples": bad.to_dict()["counts"],
        "sample_stage_seconds": round(t_sample, 3),
        "global_stage_seconds": round(t_global, 3),
        "global": gstats,
        "timing": {k: round(v, 3) for k, v in ctx.timing.items()},
    }
    write_json(
        manifest_path,
        {
            "data": [str(d) for d in ([data] if isinstance(data, str) else data)],
            "urls": urls,
            "eval_data": eval_data,
            "config": config.to_dict(),
            "summary": summary,
        },
    )
    return summary
