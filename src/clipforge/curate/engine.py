"""The local curation engine: score shards into per-shard Parquet, then run global stages and merge.

Output layout of ``clipforge curate run --output OUT``::

    OUT/config.yaml                 the full config (written first; a resume is checked against it)
    OUT/manifest.json               inputs, the full config, bad samples by reason and key, summary
    OUT/shards/STEM.parquet ...     per input shard: score table + embeddings (see curate/shard.py)
    OUT/global/dedup.parquet ...    global-stage columns (key + columns) and their stats JSON
    OUT/scores.parquet              everything joined: the table filters and reports read
    OUT/eval/...                    the eval set's own scores (dedup against an eval set)

Resume is per shard (:mod:`clipforge.curate.shard`). Memory is bounded by ``batch_size`` images per
worker plus the small per-shard columns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.config import ConfigError, check_run_config, diff_configs, from_dict, write_run_config
from clipforge.curate.clipscore import check_runtime_stages
from clipforge.curate.config import BalanceConfig, CurateConfig, DedupConfig
from clipforge.curate.context import EngineContext
from clipforge.curate.outputs import prepare_output
from clipforge.curate.plan import resolve_stages
from clipforge.curate.registry import Context, Stage
from clipforge.curate.shard import (  # noqa: F401  (iter_batches, process_shard: importable from here too)
    COLUMN_TYPES,
    EMB_NAMES,
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
    tables, embs = [], {n: [] for n in EMB_NAMES}
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


def score_evalset(eval_specs: list[str], ctx: Context, out_dir: Path, workers: int) -> dict[str, Any]:
    """Image hashes and embeddings of the eval set (scored and cached like any shard set)."""
    urls = expand_shards(eval_specs)
    has_model = ctx.config.model or ctx._model is not None
    names = ["image"] + (["clip-score"] if has_model else [])
    if has_model and "copy" in ctx.config.stages:  # copy descriptors of the eval images too
        names.append("copy")
    stages = [s for s in resolve_stages(names) if s.kind == "sample"]
    eval_dir = out_dir / "eval"
    run_local(urls, stages, ctx, eval_dir, workers=workers, progress=False)
    table, embs = load_scores(eval_dir, urls)
    return {
        "keys": table.column("key").to_pylist(),
        "phash": table.column("phash").to_pylist(),
        "emb": embs.get("image"),
        "copy": embs.get("copy"),
    }


RUN_CONFIG = "config.yaml"
MODEL_STAGES = "clip-score/safety"
# Resuming may add stages (only the missing ones run) and change the batch size (no value depends on
# it); any other difference (model, sizes, dedup/balance settings...) would mix two runs: refused.
RESUME_MAY_CHANGE = ("stages", "batch_size")
# Keys added with a default that differs from how runs behaved before them: key -> (the stage it changes,
# the old behaviour). A run dir predating the key that ran that stage resumes only with the old value
# (its descriptors were made without the low-pass: mixing two kinds in one dedup would be wrong).
BEHAVED_AS = {"dedup.copy_lowpass": ("copy", 1.0)}


def open_run_dir(
    out_dir: Path, config: CurateConfig, overwrite: bool = False, inputs: list[str] | None = None
) -> None:
    """The output-dir rule for ``curate run``: a new dir, a resume of the same config, or --overwrite.

    A dir holding an earlier ``curate run`` (its config.yaml, manifest.json or shards/) is resumed
    after :func:`~clipforge.config.check_run_config` finds the same settings; any other non-empty dir
    is refused (:class:`~clipforge.utils.OutputExistsError`) so scores never land among foreign files,
    and so is a dir holding an input shard (:mod:`clipforge.curate.outputs`).
    """
    is_run = any((out_dir / n).exists() for n in (RUN_CONFIG, "manifest.json", "shards"))
    prepare_output(out_dir, overwrite=overwrite, resume=is_run, inputs=inputs or [])
    if not (out_dir / RUN_CONFIG).exists():
        check_legacy_config(out_dir / "manifest.json", config)
    added = keys_added_since(out_dir / RUN_CONFIG, config)
    check_run_config(out_dir / RUN_CONFIG, config, ignore=(*RESUME_MAY_CHANGE, *added))
    write_run_config(out_dir / RUN_CONFIG, config)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}{key}.").items()}


def keys_added_since(path: Path, config: CurateConfig) -> list[str]:
    """Keys a run dir's config.yaml predates (e.g. ``dedup.copy_*``) and that ``config`` leaves at default.

    A run written before a setting existed behaved as its default, so resuming it is no mix of settings.
    """
    from clipforge.config import load_file

    if not path.is_file():
        return []
    try:
        saved = _flat(load_file(path))
    except (ValueError, OSError):
        return []  # check_run_config reports the unreadable file
    now, default = _flat(config.to_dict()), _flat(CurateConfig().to_dict())
    ran = saved.get("stages") or []
    before = {**default, **{k: v for k, (stage, v) in BEHAVED_AS.items() if stage in ran}}  # what it did
    return [k for k, v in now.items() if k not in saved and k in before and v == before[k]]


def check_legacy_config(manifest_path: Path, config: CurateConfig) -> None:
    """A run dir from before config.yaml: its manifest's flat config must match on the keys it has."""
    if not manifest_path.is_file():
        return
    try:
        saved = json.loads(manifest_path.read_text(encoding="utf-8")).get("config")
    except (UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{manifest_path} is unreadable ({e}); use --overwrite to start over") from None
    if not isinstance(saved, dict):
        return
    now = config.to_dict()
    diffs = [
        d
        for d in diff_configs(saved, {k: v for k, v in now.items() if k in saved})
        if d.split(":", 1)[0] not in RESUME_MAY_CHANGE
    ]
    if diffs:
        raise ConfigError(
            f"{manifest_path} was written by a run with other settings; resuming would mix them: "
            + "; ".join(diffs[:8])
            + " (use a new output dir, or --overwrite to start over)"
        )


def check_model_spec(spec: str | None) -> None:
    """Parse ``spec`` with the models package's one parser (ValueError/FileNotFoundError if unusable)."""
    from clipforge.models.spec import SPEC_HELP, parse_spec

    if not spec:
        raise ValueError(f"stages {MODEL_STAGES} need a model: pass --model SPEC ({SPEC_HELP})")
    from clipforge.export.runtime import is_onnx_export

    if not is_onnx_export(spec):  # an onnx export dir runs as is under --runtime onnx
        parse_spec(spec)


def score_shards(
    urls: list[str],
    stages: list[Stage],
    ctx: Context,
    out_dir: Path,
    *,
    engine: str,
    workers: int,
    model: Any,
    ray_address: str | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """The sample stages over every shard, on the chosen engine (same per-shard files either way)."""
    if engine == "local":
        return run_local(urls, stages, ctx, out_dir, workers, progress)
    if engine == "ray":
        from clipforge.curate.ray_engine import run_ray

        return run_ray(urls, stages, ctx.config, out_dir, workers=workers, model=model, address=ray_address)
    raise ValueError(f"unknown engine {engine!r} (local | ray)")


def merge_bad(results: list[dict[str, Any]]) -> BadSampleReport:
    bad = BadSampleReport()
    for r in results:
        if r.get("bad"):
            bad.merge(r["bad"] if "counts" in r["bad"] else {"counts": r["bad"]})
    return bad


def run_curation(
    data: list[str] | str,
    out_dir: str | Path,
    config: CurateConfig,
    *,
    engine: str = "local",
    workers: int = 1,
    model: Any = None,
    eval_data: list[str] | None = None,
    dedup: DedupConfig | dict | None = None,
    balance: BalanceConfig | dict | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    keep_scores: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run a curation recipe end to end; returns the summary that ``--json`` prints.

    ``dedup``/``balance`` are kept for old callers: they replace ``config.dedup``/``config.balance``.
    ``keep_scores`` (key -> out-of-fold clip score, from ``--folds``): the score dedup keeps the best
    member of a duplicate group by, instead of the table's ``clip_score``.
    """
    out_dir = Path(out_dir)
    if dedup is not None:
        config = dataclasses.replace(config, dedup=from_dict(DedupConfig, dedup))
    if balance is not None:
        config = dataclasses.replace(config, balance=from_dict(BalanceConfig, balance))
    urls = expand_shards(data)
    stems = [shard_stem(u) for u in urls]
    if len(set(stems)) != len(stems):
        raise ValueError("two input shards have the same file name; score tables are named after shards")
    stages = resolve_stages(config.stages)
    if model is None and any(s.needs_model for s in stages):
        check_model_spec(config.model)  # a typo fails now, not after the model-free stages ran
    check_runtime_stages(config, [s.name for s in stages])
    sample_stages = [s for s in stages if s.kind == "sample"]
    global_stages = [s for s in stages if s.kind == "global"]
    open_run_dir(out_dir, config, overwrite, inputs=urls)
    ctx = EngineContext(config, model)
    ctx.keep_scores = keep_scores
    t0 = time.perf_counter()
    results = score_shards(
        urls,
        sample_stages,
        ctx,
        out_dir,
        engine=engine,
        workers=workers,
        model=model,
        ray_address=ray_address,
        progress=progress,
    )
    t_sample = time.perf_counter() - t0
    bad = merge_bad(results)
    table, embs = load_scores(out_dir, urls)
    check_unique_keys(table)
    evalset = None
    if eval_data and any(s.name == "dedup" for s in global_stages):
        evalset = score_evalset(eval_data, ctx, out_dir, workers)
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
        out_dir / "manifest.json",
        {
            "data": [str(d) for d in ([data] if isinstance(data, str) else data)],
            "urls": urls,
            "eval_data": eval_data,
            "config": config.to_dict(),
            "bad_samples": bad.to_dict(),
            "summary": summary,
        },
    )
    return summary
