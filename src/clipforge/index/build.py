"""``clipforge index build``: shards -> per-shard parts -> one index directory.

Layout of an index directory (everything written atomically; the manifest last)::

    manifest.json     model, dims, count, index type + parameters + measured recall, shards, bad samples
    embeddings.npy    float16 [N, D] unit rows, full model dimension (row i <-> meta row i)
    meta.parquet      key, uid, shard, source, caption, captions, label, scalar KEY.json fields
    thumbs.parquet    uid, thumb (JPEG bytes) for /images/{key}
    index.faiss       the faiss index over (possibly Matryoshka-truncated) unit rows
    parts/            per-shard embeddings + rows: the resume state
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.config import check_run_config, from_dict, write_run_config
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import expand_shards
from clipforge.export.runtime import model_identity
from clipforge.index import ann
from clipforge.index.config import RESUME_MAY_CHANGE, RUN_CONFIG, BuildOptions, BuildRun  # noqa: F401
from clipforge.index.embed import EmbedSettings, embed_shard
from clipforge.models.base import ClipModel
from clipforge.models.encode import normalize_rows
from clipforge.utils import atomic_path, prepare_output_dir, write_json

log = logging.getLogger(__name__)

FORMAT = "clipforge-index/1"


def load_model_spec(spec: str | ClipModel, allow_code: bool = False, **options: Any) -> ClipModel:
    """A model (eval mode) from a spec string or saved dir via ``clipforge.models.load_model``;
    a ClipModel passes through (so builds accept loaded models and test doubles). ``allow_code`` only
    for a spec the user gave (a ``py:MODULE:FUNCTION`` spec imports code), never for one from a file."""
    if isinstance(spec, ClipModel):
        return spec.eval()
    from clipforge.models import load_model

    return load_model(spec, allow_code=allow_code, **options).eval()


def load_for_runtime(
    spec: str | ClipModel, runtime: str = "torch", threads: int | None = None, allow_code: bool = False
) -> Any:
    """``--runtime torch|onnx``: :func:`load_model_spec`'s model, or its onnx export in onnxruntime
    (export.runtime.load_runtime: exported once into the cache); an onnx export dir runs as is."""
    from clipforge.export.runtime import is_onnx_export, load_runtime

    if isinstance(spec, str) and is_onnx_export(spec):
        return load_runtime(spec, runtime, threads)
    m = load_model_spec(spec, allow_code=allow_code)
    return m if runtime == "torch" else load_runtime(m, runtime, threads)


def prepare_build_dir(output: Path, run: BuildRun, *, overwrite: bool = False, resume: bool = False) -> Path:
    """clipforge.utils.prepare_output_dir's rule for an index dir, plus: a dir holding *this* build
    resumes without a flag (as before), one holding another build (other data or model) is refused
    unless ``overwrite``; stale ``*.tmp`` files of a killed run are removed."""
    cfg = output / RUN_CONFIG
    if cfg.is_file() and not overwrite:
        check_run_config(cfg, run, ignore=RESUME_MAY_CHANGE)
        resume = True
    prepare_output_dir(output, overwrite=overwrite, resume=resume)
    write_run_config(cfg, run)
    return output


def truncate(x: np.ndarray, dims: int | None) -> np.ndarray:
    """Matryoshka truncation: keep the first ``dims`` coordinates and re-normalize."""
    x = np.asarray(x, dtype=np.float32)
    return normalize_rows(x[:, :dims]) if dims and dims < x.shape[1] else normalize_rows(x)


def assign_uids(keys: list[str]) -> tuple[list[str], int]:
    """Unique ids for /images/{key}: the key itself; a repeat (same key in another shard) becomes
    ``key~2``, ``key~3``... skipping any id that is itself a real key."""
    taken = set(keys)
    used: set[str] = set()
    out = []
    for k in keys:
        uid, n = k, 1
        while uid in used:
            n += 1
            uid = f"{k}~{n}"
            if uid in taken:
                uid = k  # a real key elsewhere: keep counting
        used.add(uid)
        out.append(uid)
    return out, sum(u != k for u, k in zip(out, keys))


def _concat_tables(tables: list[Any]) -> Any:
    import pyarrow as pa

    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a field typed differently between shards -> string
        names = {n for t in tables for n in t.column_names}
        bad = {
            n for n in names if len({str(t.schema.field(n).type) for t in tables if n in t.column_names}) > 1
        }
        out = []
        for t in tables:
            for n in bad & set(t.column_names):
                t = t.set_column(t.column_names.index(n), n, t.column(n).cast(pa.string()))
            out.append(t)
        return pa.concat_tables(out, promote_options="permissive")


def assemble(output: Path, records: list[dict[str, Any]]) -> tuple[np.ndarray, Any, Any, int]:
    """Concatenate parts (in shard order) -> (embeddings f16, meta table, thumbs table, duplicate keys)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = output / "parts"
    embs, metas = [], []
    for rec in records:
        e = np.load(parts / f"{rec['stem']}.npy")
        t = pq.read_table(parts / f"{rec['stem']}.parquet")
        if len(t) != len(e):
            raise RuntimeError(f"part {rec['stem']} is inconsistent ({len(t)} rows vs {len(e)} vectors)")
        if len(t):
            embs.append(e)
            metas.append(t)
    if not metas:
        raise RuntimeError("no images were embedded (all shards empty or every sample bad)")
    emb = np.concatenate(embs)
    table = _concat_tables(metas)
    uids, dup = assign_uids(table.column("key").to_pylist())
    table = table.add_column(1, "uid", pa.array(uids, type=pa.string()))
    thumbs = pa.table({"uid": table.column("uid"), "thumb": table.column("thumb")})
    meta = table.drop_columns(["thumb"])
    return emb, meta, thumbs, dup


def build_index(
    shards: str | list[str],
    model: str | ClipModel,
    output: str | Path,
    options: BuildOptions | dict[str, Any] | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
    resume: bool = False,
    allow_code: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Embed ``shards`` with ``model`` and write an index directory; returns the manifest.

    ``options.runtime="onnx"`` embeds with the model's onnx export (``threads`` onnxruntime threads);
    the index records the torch model's fingerprint either way (export.runtime.model_identity), so
    a server of either runtime finds it built by its model.
    Rerunning the same build continues it; see :func:`prepare_build_dir` for the output-dir rule.
    ``allow_code``: honour a ``py:MODULE:FUNCTION`` model spec (the caller's own argument only).
    """
    opt = from_dict(BuildOptions, options or {})
    opt.validate()  # an instance built directly skipped it
    t_start = time.perf_counter()
    output = Path(output)
    urls = expand_shards(shards)
    model_ref = model if isinstance(model, str) else model.config.spec
    m = load_for_runtime(model, opt.runtime, threads, allow_code=allow_code)
    settings = EmbedSettings(model_identity(m), opt.thumb_size, opt.max_per_shard)
    full_dim = int(m.config.embed_dim)
    if opt.dims is not None and not 0 < opt.dims <= full_dim:
        raise ValueError(f"--dims must be in 1..{full_dim} (the model's embedding size), got {opt.dims}")
    run = BuildRun([str(u) for u in urls], str(model_ref), settings.model, opt)
    prepare_build_dir(output, run, overwrite=overwrite, resume=resume)

    records = embed_parts(urls, output, m, settings, opt, progress)  # 1. one part per shard (resumable)
    t_embed = time.perf_counter() - t_start
    bad = BadSampleReport()
    for rec in records:
        bad.merge(rec["bad"])
    emb, meta, thumbs, dup = assemble(output, records)  # 2. one table
    if dup:
        log.warning("%d duplicate keys across shards: served as KEY~N (see the uid column)", dup)
    write_tables(output, emb, meta, thumbs)
    t_idx = time.perf_counter()
    index_info, dims_info = write_faiss_index(output, emb, opt, m)  # 3. the ann index, its recall measured
    t_index = time.perf_counter() - t_idx

    build = build_info(opt, t_embed, t_index, t_start)
    manifest = make_manifest(
        model_ref, m, settings, opt, index_info, dims_info, meta, records, bad, dup, build
    )
    write_json(output / "manifest.json", manifest)
    return manifest


def make_manifest(
    model_ref: Any, m: Any, settings: EmbedSettings, opt: BuildOptions, index_info: dict[str, Any],
    dims_info: dict[str, Any], meta: Any, records: list[dict[str, Any]], bad: BadSampleReport, dup: int,
    build: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """manifest.json: what a server needs to trust and load the index, and how it was built."""
    return {
        "format": FORMAT,
        "model": model_ref,
        "model_spec": m.config.options.get("source_spec") or m.config.spec
        if opt.runtime == "onnx"
        else m.config.spec,
        "model_fingerprint": settings.model,
        "embed_dim": dims_info["full_dim"],
        "dim": dims_info["dims"],
        "count": len(meta),
        "metric": "inner_product",
        "index": index_info,
        "dims": dims_info,
        "duplicate_keys": dup,
        "columns": [c for c in meta.column_names],
        "shards": [{k2: r[k2] for k2 in ("url", "shard", "stem", "count", "seconds")} for r in records],
        "bad_samples": bad.to_dict(),
        "build": build,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def embed_parts(
    urls: list[Any], output: Path, m: Any, settings: EmbedSettings, opt: BuildOptions, progress: bool
) -> list[dict[str, Any]]:
    """Embed each shard into its part under OUTPUT/parts (a part already there is reused)."""
    from tqdm import tqdm

    records = []
    bar = tqdm(desc="embed", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for url in urls:
            records.append(
                embed_shard(url, output / "parts", m, settings, opt.batch_size, opt.workers, progress=bar)
            )
    finally:
        bar.close()
    return records


def write_tables(output: Path, emb: np.ndarray, meta: Any, thumbs: Any) -> None:
    import pyarrow.parquet as pq

    with atomic_path(output / "embeddings.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, emb)
    with atomic_path(output / "meta.parquet") as tmp:
        pq.write_table(meta, tmp)
    with atomic_path(output / "thumbs.parquet") as tmp:
        pq.write_table(thumbs, tmp, row_group_size=4096)


def write_faiss_index(
    output: Path, emb: np.ndarray, opt: BuildOptions, m: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plan, build and tune the faiss index over (truncated) rows, write it; returns the manifest's
    ``index`` and ``dims`` entries (recall measured against exact search on sampled queries)."""
    import faiss

    n, stored_dim = emb.shape
    full = normalize_rows(emb.astype(np.float32))
    x = truncate(full, opt.dims)
    d = x.shape[1]
    plan = ann.plan_index(n, d, opt.index_type, opt.ram_budget, opt.flat_threshold, opt.refine)
    log.info("index plan: %s (%s), ~%.1f MB", plan.factory, plan.reason, plan.est_bytes / 1e6)
    index = ann.build_faiss(x, plan, seed=opt.seed)
    rng = np.random.default_rng(opt.seed)
    q_ids = np.sort(rng.choice(n, size=min(n, opt.eval_queries), replace=False))
    k = min(10, n)
    truth_same_dims = ann.exact_knn(x[q_ids], x, k)
    params, recall, sweep = ann.tune(index, plan, x[q_ids], truth_same_dims, k, opt.target_recall)
    plan.params = params
    dims_info: dict[str, Any] = {"dims": d, "full_dim": int(m.config.embed_dim)}
    if d < stored_dim:
        dims_info.update(truncation_recall(index, x[q_ids], full[q_ids], full, truth_same_dims, k))
        if not m.config.options.get("matryoshka"):
            log.warning("model does not declare Matryoshka training: truncation costs recall (measured)")
    with atomic_path(output / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    index_info = {
        **plan.to_dict(),
        f"recall@{k}": recall,
        "eval_queries": len(q_ids),
        "target_recall": opt.target_recall,
        "sweep": sweep,
    }
    return index_info, dims_info


def truncation_recall(
    index: Any, queries: np.ndarray, full_queries: np.ndarray, full: np.ndarray, truth_same_dims: Any, k: int
) -> dict[str, float]:
    """What Matryoshka truncation costs: exact and index neighbours against exact full-dim ones."""
    truth_full = ann.exact_knn(full_queries, full, k)
    found = index.search(queries, k)[1]
    return {
        "recall@10_exact_truncated_vs_full": ann.knn_recall(truth_same_dims, truth_full, k),
        "recall@10_index_vs_full": ann.knn_recall(found, truth_full, k),
    }


def build_info(opt: BuildOptions, t_embed: float, t_index: float, t_start: float) -> dict[str, Any]:
    return {
        "batch_size": opt.batch_size,
        "workers": opt.workers,
        "thumb_size": opt.thumb_size,
        "max_per_shard": opt.max_per_shard,
        "runtime": opt.runtime,
        "embed_seconds": round(t_embed, 3),
        "index_seconds": round(t_index, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
    }


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    mf = p / "manifest.json" if p.is_dir() else p
    if not mf.is_file():
        raise FileNotFoundError(f"no index at {path} (manifest.json missing; run `clipforge index build`)")
    data = json.loads(mf.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{mf}: unknown index format {data.get('format')!r} (expected {FORMAT})")
    return data
