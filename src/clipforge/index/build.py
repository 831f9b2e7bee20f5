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
    import faiss
    import pyarrow.parquet as pq
    from tqdm import tqdm

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

    # 1. embed, one part per shard (resumable)
    records = []
    bar = tqdm(desc="embed", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for url in urls:
            records.append(
                embed_shard(url, output / "parts", m, settings, opt.batch_size, opt.workers, progress=bar)
            )
    finally:
        bar.close()
    t_embed = time.perf_counter() - t_start
    bad = BadSampleReport()
    for rec in records:
        bad.merge(rec["bad"])

    # 2. assemble
    emb, meta, thumbs, dup = assemble(output, records)
    if dup:
        log.warning("%d duplicate keys across shards: served as KEY~N (see the uid column)", dup)
    n, stored_dim = emb.shape
    with atomic_path(output / "embeddings.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, emb)
    with atomic_path(output / "meta.parquet") as tmp:
        pq.write_table(meta, tmp)
    with atomic_path(output / "thumbs.parquet") as tmp:
        pq.write_table(thumbs, tmp, row_group_size=4096)

    # 3. faiss index (+ recall measurements against exact full-dim search)
    t_idx = time.perf_counter()
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
    dims_info: dict[str, Any] = {"dims": d, "full_dim": full_dim}
    if d < stored_dim:
        truth_full = ann.exact_knn(full[q_ids], full, k)
        dims_info["recall@10_exact_truncated_vs_full"] = ann.knn_recall(truth_same_dims, truth_full, k)
        found = index.search(x[q_ids], k)[1]
        dims_info["recall@10_index_vs_full"] = ann.knn_recall(found, truth_full, k)
        if not m.config.options.get("matryoshka"):
            log.warning("model does not declare Matryoshka training: truncation costs recall (measured)")
    with atomic_path(output / "index.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    t_index = time.perf_counter() - t_idx

    manifest = {
        "format": FORMAT,
        "model": model_ref,
        "model_spec": m.config.options.get("source_spec") or m.config.spec
        if opt.runtime == "onnx"
        else m.config.spec,
        "model_fingerprint": settings.model,
        "embed_dim": full_dim,
        "dim": d,
        "count": n,
        "metric": "inner_product",
        "index": {
            **plan.to_dict(),
            f"recall@{k}": recall,
            "eval_queries": len(q_ids),
            "target_recall": opt.target_recall,
            "sweep": sweep,
        },
        "dims": dims_info,
        "duplicate_keys": dup,
        "columns": [c for c in meta.column_names],
        "shards": [{k2: r[k2] for k2 in ("url", "shard", "stem", "count", "seconds")} for r in records],
        "bad_samples": bad.to_dict(),
        "build": {
            "batch_size": opt.batch_size,
            "workers": opt.workers,
            "thumb_size": opt.thumb_size,
            "max_per_shard": opt.max_per_shard,
            "runtime": opt.runtime,
            "embed_seconds": round(t_embed, 3),
            "index_seconds": round(t_index, 3),
            "total_seconds": round(time.perf_counter() - t_start, 3),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(output / "manifest.json", manifest)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    mf = p / "manifest.json" if p.is_dir() else p
    if not mf.is_file():
        raise FileNotFoundError(f"no index at {path} (manifest.json missing; run `clipforge index build`)")
    data = json.loads(mf.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{mf}: unknown index format {data.get('format')!r} (expected {FORMAT})")
    return data
