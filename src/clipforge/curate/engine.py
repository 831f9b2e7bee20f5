"""The local curation engine: score shards into per-shard Parquet, then run global stages and merge.

Output layout of ``clipforge curate run --output OUT``::

    OUT/manifest.json               inputs, stages, config, per-shard status, bad-sample counts
    OUT/shards/STEM.parquet ...     per input shard: score table + embeddings (see curate/shard.py)
    OUT/global/dedup.parquet ...    global-stage columns (key + columns) and their stats JSON
    OUT/scores.parquet              everything joined: the table filters and reports read
    OUT/eval/...                    the eval set's own scores (dedup against an eval set)

Resume is per shard (:mod:`clipforge.curate.shard`). Memory is bounded by ``batch_size`` images per
worker plus the small per-shard columns.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.curate.config import CurateConfig
from clipforge.curate.plan import resolve_stages
from clipforge.curate.registry import Context, Stage
from clipforge.curate.shard import (  # noqa: F401  (iter_batches, process_shard: importable from here too)
    COLUMN_TYPES,
    iter_batches,
    process_shard,
    shard_paths,
    shard_stem,
    to_table,
)
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards
from clipforge.utils import atomic_path, write_json

log = logging.getLogger(__name__)


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
