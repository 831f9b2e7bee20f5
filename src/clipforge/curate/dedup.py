"""``dedup`` stage: exact, perceptual and semantic duplicates, and duplicates of an evaluation set.

- exact: same image bytes (sha256); captions are compared after normalization (lowercase, words only)
  but only *counted* (``caption_dup_count``): templated captions ("a dog runs on the grass") repeat
  legitimately, so they do not make a pair a duplicate by themselves.
- near: pHash Hamming distance <= ``phash_radius`` (faiss binary index, k nearest neighbours).
- copy (``copy`` stage): centered, normalized pre-head descriptors of the frozen image tower, pairs
  with cosine >= ``copy_threshold``, calibrated on synthetic copies when unset
  (:mod:`clipforge.curate.copydetect`). ``near_rule`` combines them with pHash: ``or`` (default: a pair
  is a near copy if either says so), ``and``, ``phash`` or ``descriptor`` only.
- semantic (SemDeDup, Abbas et al. 2023): k-means clusters of the image embeddings, then pairs with
  cosine >= ``threshold`` within a cluster. We search each point's k nearest neighbours in an IVF index
  built on those k-means centroids with ``nprobe`` > 1 clusters probed, which is SemDeDup with soft
  cluster borders: a duplicate pair split across two neighbouring clusters is still found (that is
  what lifts recall of planted duplicates from ~0.9 to >= 0.99 on random data). Below
  ``exact_search_max`` rows the search is exact (flat index).
- Pairs are joined into groups (connected components); in each group ONE sample is kept: the best
  clip score (DataComp-style) or, with ``keep="centroid"``, the one nearest the group mean (SemDeDup).
  The clip score is the out-of-fold one when ``curate run --folds K`` made it (``ctx.keep_scores``,
  read from ``OUT/folds/oof.parquet``: an in-sample scorer rates the pairs it memorized, shuffled or
  not, as good ones), else the table's ``clip_score`` column; without either, the one nearest the group
  mean when image embeddings exist, else the first row. ``dedup.stats.json`` says which (``keep_by``).
  Every other member gets ``*_dup_of = <kept key>``.
- eval: a train sample is an eval duplicate when its image embedding has cosine >= ``eval_threshold``
  with any eval image, or its pHash is within ``phash_radius`` of one, or (copy stage) its copy
  descriptor reaches the copy cut with one (as DataComp removes test-set near-duplicates from its pools).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

import numpy as np

from clipforge.curate.config import DedupConfig
from clipforge.curate.hashing import to_bytes
from clipforge.curate.stages import register_stage

log = logging.getLogger(__name__)


def normalize_caption(text: str | None) -> str | None:
    if not text:
        return None
    norm = " ".join(re.findall(r"[^\W_]+", text.lower()))
    return norm or None


# -- grouping ------------------------------------------------------------------------------------
def groups_from_pairs(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label per row from undirected pairs (rows without pairs are singletons)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(i) == 0:
        return np.arange(n)
    g = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    return connected_components(g, directed=False)[1]


QUALITY_TIE = 1e-4  # keep-scores closer than this are one score (:func:`keeper_of`)


def keeper_of(labels: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """For each row, the row index kept for its group: highest quality, ties to the earliest row.

    Qualities equal to QUALITY_TIE are ties: an exact copy (same image, same caption) scores the same
    up to float noise, and letting that noise pick the member made reruns keep other keys (so other
    folds and trusted sets downstream)."""
    n = len(labels)
    q = np.where(np.isnan(quality), -np.inf, np.round(quality / QUALITY_TIE) * QUALITY_TIE)
    order = np.lexsort((np.arange(n), -q, labels))  # by group, best quality first, then row
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    best_of_group = np.empty(labels.max() + 1 if n else 0, dtype=np.int64)
    best_of_group[labels[order][first]] = order[first]
    return best_of_group[labels]


def dup_of_column(keys: list[str], keeper: np.ndarray) -> list[str | None]:
    return [None if k == i else keys[k] for i, k in enumerate(keeper)]


# -- exact ---------------------------------------------------------------------------------------
def exact_groups(values: list[Any]) -> np.ndarray:
    """Group label per row: rows with equal non-null values share a label."""
    first: dict[Any, int] = {}
    out = np.arange(len(values))
    for i, v in enumerate(values):
        if v is None:
            continue
        out[i] = first.setdefault(v, i)
    return out


# -- near (perceptual hash) ----------------------------------------------------------------------
def phash_pairs(hashes: list[int | None], radius: int, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows whose 64-bit hashes differ in <= radius bits (k nearest per row, faiss binary)."""
    import faiss

    rows = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    if len(rows) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes = to_bytes(np.array([hashes[i] for i in rows], dtype=np.int64))
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    d, nn = index.search(codes, min(k, len(rows)))
    src = np.repeat(np.arange(len(rows)), nn.shape[1])
    d, nn = d.ravel(), nn.ravel()
    m = (nn >= 0) & (nn != src) & (d <= radius)
    return rows[src[m]], rows[nn[m]]


# -- semantic (SemDeDup on faiss) ----------------------------------------------------------------
def semantic_pairs(emb: np.ndarray, cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) for pairs with cosine >= cfg.threshold among the non-NaN rows of ``emb``.

    ``emb`` may be float16 (a 1M x 512 set is 1 GiB); it is converted to float32 chunk by chunk.
    """
    import faiss

    valid = ~np.isnan(emb[:, 0])
    rows = np.flatnonzero(valid)
    n, dim = len(rows), emb.shape[1]
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2:
        return empty

    def chunk(a: int, b: int) -> np.ndarray:
        x = np.ascontiguousarray(emb[rows[a:b]], dtype=np.float32)
        faiss.normalize_L2(x)
        return x

    if n <= cfg.exact_search_max:
        index = faiss.IndexFlatIP(dim)
        index.add(chunk(0, n))
    else:
        nlist = cfg.nlist or int(min(max(1, 4 * math.sqrt(n)), n // 39))
        train_n = min(n, nlist * 32)
        rng = np.random.default_rng(cfg.seed)
        sample = np.ascontiguousarray(
            emb[np.sort(rng.choice(rows, train_n, replace=False))], dtype=np.float32
        )
        faiss.normalize_L2(sample)
        log.info("semantic dedup: k-means with %d clusters on %d of %d embeddings", nlist, train_n, n)
        km = faiss.Kmeans(dim, nlist, niter=10, seed=cfg.seed, spherical=True, verbose=False)
        km.train(sample)
        del sample
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(km.centroids)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        for a in range(0, n, cfg.chunk):
            index.add(chunk(a, min(n, a + cfg.chunk)))
        index.nprobe = min(cfg.nprobe, nlist)
    out_i, out_j, out_s = [], [], []
    k = min(cfg.k + 1, n)
    for a in range(0, n, cfg.chunk):
        b = min(n, a + cfg.chunk)
        sims, nn = index.search(chunk(a, b), k)
        src = np.repeat(np.arange(a, b), k)
        sims, nn = sims.ravel(), nn.ravel()
        m = (nn >= 0) & (nn != src) & (sims >= cfg.threshold)
        out_i.append(rows[src[m]])
        out_j.append(rows[nn[m]])
        out_s.append(sims[m])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def copy_pairs(
    unit: np.ndarray, threshold: float, cfg: DedupConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) for copy-descriptor pairs >= threshold: the same search on the copy descriptors."""
    return semantic_pairs(unit, dataclasses.replace(cfg, threshold=float(threshold)))


def centroid_quality(emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cosine of each row to its group's mean embedding (SemDeDup's 'keep nearest the centroid')."""
    x = np.nan_to_num(emb.astype(np.float32))
    sums = np.zeros((labels.max() + 1, x.shape[1]), dtype=np.float32)
    np.add.at(sums, labels, x)
    sums /= np.linalg.norm(sums, axis=1, keepdims=True) + 1e-12
    return (x * sums[labels]).sum(axis=1)


def semantic_dedup(
    keys: list[str], emb: np.ndarray, quality: np.ndarray | None, cfg: DedupConfig
) -> dict[str, Any]:
    """SemDeDup columns ``semantic_dup_of`` and ``semantic_max_sim`` for one embedding matrix."""
    n = len(keys)
    i, j, s = semantic_pairs(emb, cfg)
    labels = groups_from_pairs(n, i, j)
    if cfg.keep == "centroid" or quality is None:
        q = centroid_quality(emb, labels)
    else:
        q = quality
    max_sim = np.full(n, np.nan, dtype=np.float32)
    if len(s):
        np.fmax.at(max_sim, i, s)
    return {
        "semantic_dup_of": dup_of_column(keys, keeper_of(labels, q)),
        "semantic_max_sim": [None if np.isnan(v) else float(v) for v in max_sim],
        "pairs": len(i) // 2,
        "i": i,
        "j": j,
    }


def eval_duplicates(
    emb: np.ndarray | None,
    hashes: list[int | None] | None,
    eval_keys: list[str],
    eval_emb: np.ndarray | None,
    eval_hashes: list[int | None] | None,
    cfg: DedupConfig,
) -> dict[str, list]:
    """Nearest eval image per train sample by embedding cosine and by pHash distance."""
    import faiss

    n = len(emb) if emb is not None else len(hashes or [])
    sim: list[float | None] = [None] * n
    of: list[str | None] = [None] * n
    hdist: list[int | None] = [None] * n
    if emb is not None and eval_emb is not None:
        ev = np.flatnonzero(~np.isnan(eval_emb[:, 0]))
        x_eval = np.ascontiguousarray(eval_emb[ev], dtype=np.float32)
        faiss.normalize_L2(x_eval)
        index = faiss.IndexFlatIP(x_eval.shape[1])
        index.add(x_eval)
        rows = np.flatnonzero(~np.isnan(emb[:, 0]))
        for a in range(0, len(rows), cfg.chunk):
            r = rows[a : a + cfg.chunk]
            q = np.ascontiguousarray(emb[r], dtype=np.float32)
            faiss.normalize_L2(q)
            d, nn = index.search(q, 1)
            for row, dd, jj in zip(r, d[:, 0], nn[:, 0]):
                sim[row] = float(dd)
                if dd >= cfg.eval_threshold:
                    of[row] = eval_keys[ev[jj]]
    if hashes is not None and eval_hashes is not None:
        ev = [i for i, h in enumerate(eval_hashes) if h is not None]
        rows = [i for i, h in enumerate(hashes) if h is not None]
        if ev and rows:
            index = faiss.IndexBinaryFlat(64)
            index.add(to_bytes(np.array([eval_hashes[i] for i in ev], dtype=np.int64)))
            d, nn = index.search(to_bytes(np.array([hashes[i] for i in rows], dtype=np.int64)), 1)
            for row, dd, jj in zip(rows, d[:, 0], nn[:, 0]):
                hdist[row] = int(dd)
                if dd <= cfg.phash_radius and of[row] is None:
                    of[row] = eval_keys[ev[jj]]
    return {"eval_sim": sim, "eval_phash_dist": hdist, "eval_dup_of": of}


def combine_near(
    n: int, ph: tuple[np.ndarray, np.ndarray], de: tuple[np.ndarray, np.ndarray], rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """Near-copy edges under ``rule``: or = union, and = pairs both found, phash/descriptor = one of them."""
    if rule == "phash":
        return ph
    if rule == "descriptor":
        return de
    if rule == "or":
        return np.concatenate([ph[0], de[0]]), np.concatenate([ph[1], de[1]])
    a = set(zip(np.minimum(*ph).tolist(), np.maximum(*ph).tolist()))
    both = [p for p in zip(np.minimum(*de).tolist(), np.maximum(*de).tolist()) if p in a]
    return np.array([p[0] for p in both], np.int64), np.array([p[1] for p in both], np.int64)


def phash_covered(table: Any, cfg: DedupConfig) -> np.ndarray | None:
    """Per row: its synthetic calibration copy is within ``phash_radius`` of it (pHash alone catches it)."""
    cols = table.column_names
    if "phash" not in cols or "copy_calib_phash" not in cols:
        return None
    from clipforge.curate.hashing import hamming

    return np.array(
        [
            a is not None and b is not None and hamming(a, b) <= cfg.phash_radius
            for a, b in zip(table.column("phash").to_pylist(), table.column("copy_calib_phash").to_pylist())
        ],
        dtype=bool,
    )


def copy_dedup(
    keys: list[str],
    desc: np.ndarray,
    aug: np.ndarray | None,
    table: Any,
    quality: np.ndarray,
    cfg: DedupConfig,
) -> dict[str, Any]:
    """Copy-descriptor pairs at the given or calibrated threshold -> ``copy_dup_of``/``copy_max_sim``."""
    from clipforge.curate.copydetect import calibrate_from_rows, center_normalize

    n = len(keys)
    unit, mean = center_normalize(desc)
    stats: dict[str, Any] = {}
    t = cfg.copy_threshold
    if t is not None:
        stats["copy_threshold_source"] = "config"
    else:
        n_cal = 0 if aug is None else int((~np.isnan(aug[:, 0])).sum())
        if n_cal < cfg.copy_calib_min:
            t = cfg.copy_fallback
            stats["copy_threshold_source"] = f"fallback ({n_cal} synthetic copies < copy_calib_min)"
            log.warning("copy dedup: %d synthetic copies, too few to calibrate; threshold %.3f", n_cal, t)
        else:
            kinds = (
                table.column("copy_calib_kind").to_pylist()
                if "copy_calib_kind" in table.column_names
                else [None] * n
            )
            unit_aug, _ = center_normalize(aug, mean)
            covered = phash_covered(table, cfg) if cfg.near_rule == "or" else None
            cal = calibrate_from_rows(
                unit, unit_aug, kinds, cfg.copy_precision, cfg.exact_search_max, cfg.seed, covered
            )
            stats["copy_calibrated_for"] = (
                "or (copies pHash catches count as caught)" if covered is not None else "descriptor"
            )
            t = cal["threshold"]
            stats["copy_threshold_source"] = "calibrated"
            stats["copy_calibration"] = {k: v for k, v in cal.items() if k != "threshold"}
    stats["copy_threshold"] = round(float(t), 6)
    i, j, s = copy_pairs(unit, t, cfg)
    max_sim = np.full(n, np.nan, dtype=np.float32)
    if len(s):
        np.fmax.at(max_sim, i, s)
    stats["copy_pairs"] = len(i) // 2
    return {
        "copy_dup_of": dup_of_column(keys, keeper_of(groups_from_pairs(n, i, j), quality)),
        "copy_max_sim": [None if np.isnan(v) else float(v) for v in max_sim],
        "i": i,
        "j": j,
        "stats": stats,
        "unit": unit,
        "mean": mean,
        "threshold": float(t),
    }


def eval_copies(
    unit: np.ndarray, mean: np.ndarray, eval_desc: np.ndarray, eval_keys: list[str], threshold: float
) -> tuple[list[float | None], list[str | None]]:
    """Nearest eval image per row by copy descriptor (centered with the train mean): cosine, key if >= cut."""
    import faiss

    from clipforge.curate.copydetect import center_normalize

    n = len(unit)
    sim: list[float | None] = [None] * n
    of: list[str | None] = [None] * n
    ev_unit, _ = center_normalize(eval_desc, mean)
    ev = np.flatnonzero(~np.isnan(ev_unit[:, 0]))
    rows = np.flatnonzero(~np.isnan(unit[:, 0]))
    if len(ev) == 0 or len(rows) == 0:
        return sim, of
    index = faiss.IndexFlatIP(ev_unit.shape[1])
    index.add(np.ascontiguousarray(ev_unit[ev], dtype=np.float32))
    d, nn = index.search(np.ascontiguousarray(unit[rows], dtype=np.float32), 1)
    for row, dd, jj in zip(rows, d[:, 0], nn[:, 0]):
        sim[row] = float(dd)
        if dd >= threshold:
            of[row] = eval_keys[ev[jj]]
    return sim, of


def keep_quality(table: Any, keep_scores: dict[str, float] | None) -> tuple[np.ndarray, str]:
    """The per-row score a duplicate group keeps its best member by, and its name: the out-of-fold clip
    score when given (keys it lacks rank last), else the table's ``clip_score``, else zeros (row order)."""
    keys = table.column("key").to_pylist()
    if keep_scores is not None:
        oof = [keep_scores.get(k) for k in keys]
        return np.array([np.nan if v is None else v for v in oof], dtype=np.float64), "clip_score (oof)"
    if "clip_score" in table.column_names:
        vals = table.column("clip_score").to_pylist()
        return np.array([np.nan if v is None else v for v in vals], dtype=np.float64), "clip_score"
    return np.zeros(len(keys)), "row order"


@register_stage("dedup", kind="global")
def dedup_stage(
    table: Any, emb: dict[str, np.ndarray], ctx: Any, evalset: dict[str, Any] | None = None
) -> dict:
    """Exact (sha256), near (pHash) and semantic (SemDeDup) duplicates; eval-set duplicates if given."""
    cfg: DedupConfig = ctx.config.dedup
    cols = table.column_names
    keys = table.column("key").to_pylist()
    n = len(keys)
    quality, keep_by = keep_quality(table, getattr(ctx, "keep_scores", None))
    scored = keep_by != "row order"
    out: dict[str, Any] = {"key": keys}
    stats: dict[str, Any] = {}
    edges: list[tuple[np.ndarray, np.ndarray]] = []
    dup_cols = []
    if "sha256" in cols:
        labels = exact_groups(table.column("sha256").to_pylist())
        out["exact_dup_of"] = dup_of_column(keys, keeper_of(labels, quality))
        edges.append((np.arange(n), labels))
        dup_cols.append("exact_dup_of")
    if "caption" in cols:
        norm = [normalize_caption(c) for c in table.column("caption").to_pylist()]
        counts: dict[str, int] = {}
        for c in norm:
            if c is not None:
                counts[c] = counts.get(c, 0) + 1
        out["caption_dup_count"] = [counts.get(c, 0) if c is not None else 0 for c in norm]
    if "phash" in cols:
        i, j = phash_pairs(table.column("phash").to_pylist(), cfg.phash_radius, cfg.phash_k)
        out["near_dup_of"] = dup_of_column(keys, keeper_of(groups_from_pairs(n, i, j), quality))
        edges.append((i, j))
        dup_cols.append("near_dup_of")
    near_edges = {}
    if "phash" in cols:
        near_edges["phash"] = edges[-1]
    cp = None
    if "copy" in emb:
        cp = copy_dedup(keys, emb["copy"], emb.get("copyaug"), table, quality, cfg)
        out["copy_dup_of"], out["copy_max_sim"] = cp["copy_dup_of"], cp["copy_max_sim"]
        stats.update(cp["stats"])
        near_edges["descriptor"] = (cp["i"], cp["j"])
        dup_cols.append("copy_dup_of")
    if len(near_edges) == 2:  # the combination rule replaces the pHash edges by the combined ones
        edges = [e for e in edges if e is not near_edges["phash"]]
        edges.append(combine_near(n, near_edges["phash"], near_edges["descriptor"], cfg.near_rule))
        stats["near_rule"] = cfg.near_rule
    elif "descriptor" in near_edges:
        edges.append(near_edges["descriptor"])
    if "image" in emb:
        sem = semantic_dedup(keys, emb["image"], quality if scored else None, cfg)
        out["semantic_dup_of"] = sem["semantic_dup_of"]
        out["semantic_max_sim"] = sem["semantic_max_sim"]
        edges.append((sem["i"], sem["j"]))
        stats["semantic_pairs"] = sem["pairs"]
        dup_cols.append("semantic_dup_of")
    if not dup_cols:
        raise ValueError("dedup needs the image stage (sha256, phash), copy and/or clip-score (embeddings)")
    # One decision over the union of all duplicate edges: per-type keepers may disagree, and deciding per
    # type could drop every member of a group (A kept by sha256, but B kept by SemDeDup, ...).
    labels = groups_from_pairs(
        n, np.concatenate([e[0] for e in edges]), np.concatenate([e[1] for e in edges])
    )
    if "image" in emb and (cfg.keep == "centroid" or not scored):
        quality, keep_by = centroid_quality(emb["image"], labels), "centroid"
    out["dup_of"] = dup_of_column(keys, keeper_of(labels, quality))
    stats["keep_by"] = keep_by
    out["is_duplicate"] = [d is not None for d in out["dup_of"]]
    stats["duplicates"] = sum(out["is_duplicate"])
    if evalset is not None:
        ev = eval_duplicates(
            emb.get("image"),
            table.column("phash").to_pylist() if "phash" in cols else None,
            evalset["keys"],
            evalset.get("emb"),
            evalset.get("phash"),
            cfg,
        )
        if cp is not None and evalset.get("copy") is not None:  # near copies of eval images
            out["eval_copy_sim"], copy_of = eval_copies(
                cp["unit"], cp["mean"], evalset["copy"], evalset["keys"], cp["threshold"]
            )
            ev["eval_dup_of"] = [a if a is not None else b for a, b in zip(ev["eval_dup_of"], copy_of)]
            stats["eval_copy_dup"] = sum(v is not None for v in copy_of)
        out.update(ev)
        out["is_eval_duplicate"] = [d is not None for d in ev["eval_dup_of"]]
    for c in dup_cols + (["eval_dup_of"] if evalset is not None else []):
        stats[c] = sum(v is not None for v in out[c])
    out["__stats__"] = stats
    return out
