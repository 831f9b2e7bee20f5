"""Out-of-fold clip scores: K scorers trained on the data itself, each scoring the fold it never saw.

Why: with no pretrained CLIP at hand, the only scorer is one trained on the noisy pairs, and a scorer
scores the pairs it trained on as it memorized them - a shuffled caption it saw scores almost like a
true one (corrupted flickr8k: in-sample recall of shuffled pairs 0.63, out of fold 0.75+). So the
samples are split into K folds by a stable hash of their key (a sample's fold never depends on the
shard layout or on the other samples), scorer i trains a recipe (the quickstart's, through the train
stage's public API) on every fold but i, and scores fold i.

Layout under ``OUT/folds`` (every step resumable: a finished step's output is reused)::

    split.json                 inputs, K, salt, rows per fold (written last: the split is done)
    data/fold{i}-NNNNNN.tar    the samples of fold i (copied once; the scorers train on these)
    feature_cache/             locked-tower features of the fold shards, shared by all scorers
    scorer{i}/                 scorer i's training run (model in scorer{i}/model)
    scores/fold{i}.parquet     key, fold, clip_score of fold i under scorer i
    oof.parquet                all of them: the out-of-fold clip_score of every key

With a locked image tower (the quickstart recipe) a fold is scored from the feature cache its
scorers already built: no image goes through the tower a second time. Used by ``clipforge curate
run --stages clip-score --folds K --recipe quickstart`` (:func:`merge_oof` puts the column into
``OUT/scores.parquet``) and by ``benchmarks/curation_proof.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.curate.config import FoldsConfig
from clipforge.data.shards import expand_shards
from clipforge.utils import atomic_path, write_json

log = logging.getLogger(__name__)
RECIPE_NAMES = {"quickstart": "best", "frozen-linear": "frozen-linear"}  # -> clipforge.quickstart.RECIPES


def fold_of(key: str, k: int, seed: int = 0) -> int:
    """The fold of a sample key: a stable hash (same key, same fold, on any machine and shard layout)."""
    h = hashlib.sha1(f"{seed}:{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") % k


def split_folds(urls: list[str], out: Path, k: int, seed: int = 0, maxcount: int = 1000) -> dict[str, Any]:
    """Copy the samples of ``urls`` into K fold shard sets (``out/data/fold{i}-*.tar``); resumable.

    A finished split (``out/split.json`` for the same inputs, K and salt) is reused; a half-written one
    (killed) is replaced. Keys must be unique across the inputs (scores are keyed by sample key)."""
    from clipforge.data.reader import iter_tar_samples
    from clipforge.data.writer import ShardWriter

    marker = out / "split.json"
    want = {"inputs": list(urls), "k": k, "seed": seed}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if {x: done.get(x) for x in want} == want:
            return done
        raise ValueError(
            f"{out} holds a fold split of other inputs or another K/seed ({done.get('k')} folds); "
            "use a new --output or --overwrite"
        )
    tmp = out / "data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writers = [ShardWriter(output_dir=tmp, prefix=f"fold{i}", maxcount=maxcount) for i in range(k)]
    rows, seen, dups = [0] * k, set(), []
    try:
        for url in urls:
            for s in iter_tar_samples(url):
                key = s["__key__"]
                if key in seen:
                    dups.append(key)
                    continue
                seen.add(key)
                i = fold_of(key, k, seed)
                writers[i].write({n: v for n, v in s.items() if not n.startswith("__") or n == "__key__"})
                rows[i] += 1
    finally:
        for w in writers:
            w.close()
    if dups:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"sample keys must be unique across the inputs ({len(dups)} repeats, e.g. {dups[:3]})"
        )
    if min(rows) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{k} folds of {sum(rows)} samples leave a fold empty: use fewer folds")
    shutil.rmtree(out / "data", ignore_errors=True)
    tmp.rename(out / "data")
    done = {**want, "rows": rows, "shards": {str(i): fold_shards(out, i) for i in range(k)}}
    write_json(marker, done)
    return done


def fold_shards(out: Path, i: int) -> list[str]:
    return [str(p) for p in sorted((out / "data").glob(f"fold{i}-*.tar"))]


def train_scorer(
    train: list[str], run_dir: Path, cfg: FoldsConfig, cache_dir: Path, threads: int | None
) -> tuple[str, Any]:
    """Train the fold scorer with the recipe (the quickstart's settings; ``cfg.epochs`` overrides);
    returns its model dir and the trained model (None when a finished run, ``run_dir/model`` +
    ``result.json``, is reused)."""
    if (run_dir / "model").is_dir() and (run_dir / "result.json").is_file():
        return str(run_dir / "model"), None
    from clipforge.models import load_model
    from clipforge.quickstart import RECIPES
    from clipforge.train import TrainConfig, fit
    from clipforge.train.data import count_samples

    rec = RECIPES[RECIPE_NAMES[cfg.recipe]]
    tr = dict(rec["train"])
    if cfg.epochs is not None:
        tr["epochs"] = cfg.epochs
    if cfg.batch_size is not None:
        tr["batch_size"] = cfg.batch_size
    warmup_frac = tr.pop("warmup_frac")
    steps_per_epoch = max(1, count_samples(train) // tr["batch_size"])
    spec = cfg.model or "towers:efficientnet-lite0+minilm-l6"
    opts = dict(cfg.model_opts) if cfg.model else rec["model_opts"]
    tcfg = TrainConfig(
        model=spec,
        model_opts=opts,
        data=list(train),
        output=str(run_dir),
        cache_dir=str(cache_dir),
        warmup=int(warmup_frac * tr["epochs"] * steps_per_epoch),
        cache_batch_size=128,
        threads=threads,
        seed=cfg.seed,
        progress=False,
        tensorboard=False,
        **tr,
    )
    if run_dir.exists():  # a killed run: start it over (its checkpoint would need the same budget)
        shutil.rmtree(run_dir)
    model = fit(load_model(spec, allow_code=True, **opts), list(train), tcfg)
    res = getattr(model, "train_result", {})
    return str(res.get("model_dir") or model.save(run_dir / "model")), model.eval()


def score_fold(
    model_dir: str,
    shards: list[str],
    cache_dir: Path,
    batch_size: int = 128,
    model: Any = None,
    captions: str = "first",
) -> dict[str, float]:
    """key -> clip score (cosine of the image and its KEY.txt caption) of ``shards`` under ``model_dir``
    (``model``: the same model already in memory).

    A locked image tower reads the feature cache (frozen features -> the scorer's heads); otherwise
    the images go through the model (the curate clip-score stage's encode layer). ``captions="all"``
    (locked towers): the mean cosine over every caption of the sample (KEY.txt + KEY.json captions,
    all of which the trainer reads) - a shuffled pair has all of them wrong, a clean one all right, so
    the mean separates them better than one caption (corrupted flickr8k, 2 folds: AUC of shuffled vs
    rest 0.862 -> 0.894)."""
    import torch

    from clipforge.models import load_model

    if model is None:
        model = load_model(model_dir, allow_code=True)  # a scorer this run trained (spec: --folds.model)
    if model.image_locked and model.text_locked:
        from clipforge.caption.features import head_embeddings
        from clipforge.train.cache import load_or_build_cache

        data, _ = load_or_build_cache(
            model, shards, cache_dir, batch_size=batch_size, workers=1, progress=False
        )
        img = head_embeddings(model, data.image, "image")
        if captions == "all":
            if data.text is None:
                raise ValueError("folds.captions=all needs a locked text tower (cached caption features)")
            txt = head_embeddings(model, data.text, "text")
            off = data.text_offsets.long().tolist()
            mean = {}
            for n, k in enumerate(data.keys):
                if off[n + 1] > off[n] and data.captions[n] and data.captions[n][0]:
                    mean[k] = float((txt[off[n] : off[n + 1]] @ img[n]).mean())
            return mean
        if data.text is not None:
            # row 0 of each sample's captions is its KEY.txt caption (samples without one are left out)
            first = data.text_offsets[:-1].long().clamp(max=max(0, int(data.text_offsets[-1]) - 1))
            txt = head_embeddings(model, {k: v[first] for k, v in data.text.items()}, "text")
        else:
            from clipforge.models.encode import embed_texts

            txt = torch.from_numpy(np.array(embed_texts(model, [c[0] if c else "" for c in data.captions])))
        score = (img * txt).sum(1).tolist()
        return {k: float(s) for k, s, caps in zip(data.keys, score, data.captions) if caps and caps[0]}
    if captions != "first":
        raise ValueError("folds.captions=all needs locked towers (the recipe's); this scorer is not locked")
    from clipforge.curate.config import CurateConfig
    from clipforge.curate.engine import run_curation

    out = cache_dir.parent / f"score_{Path(model_dir).parent.name}"
    run_curation(
        shards, out, CurateConfig(stages=["clip-score"], model=model_dir), model=model, progress=False
    )
    t = pq.read_table(out / "scores.parquet", columns=["key", "clip_score"])
    return {
        k: s for k, s in zip(t.column("key").to_pylist(), t.column("clip_score").to_pylist()) if s is not None
    }


def run_folds(
    data: list[str] | str, out_dir: str | Path, cfg: FoldsConfig, *, threads: int | None = None
) -> dict[str, Any]:
    """Split, train K scorers, score each fold out of fold; writes ``out_dir/oof.parquet``.

    Returns a summary: rows per fold, scorer model dirs, seconds per step. Every step is resumable."""
    if cfg.k < 2:
        raise ValueError(f"out-of-fold scoring needs K >= 2 folds, got {cfg.k}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    urls = expand_shards(data)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "feature_cache"
    times: dict[str, float] = {}
    t = time.perf_counter()
    split = split_folds(urls, out, cfg.k, cfg.seed)
    times["split_s"] = round(time.perf_counter() - t, 1)
    shards = {i: fold_shards(out, i) for i in range(cfg.k)}
    scorers, keys, folds, scores = [], [], [], []
    for i in range(cfg.k):
        t = time.perf_counter()
        train = [u for j in range(cfg.k) if j != i for u in shards[j]]
        model_dir, model = train_scorer(train, out / f"scorer{i}", cfg, cache_dir, threads)
        scorers.append(model_dir)
        times[f"train{i}_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        suffix = "" if cfg.captions == "first" else f"-{cfg.captions}"  # one file per scoring rule
        path = out / "scores" / f"fold{i}{suffix}.parquet"
        if not path.is_file():
            s = score_fold(model_dir, shards[i], cache_dir, model=model, captions=cfg.captions)
            path.parent.mkdir(parents=True, exist_ok=True)
            table = pa.table(
                {
                    "key": list(s),
                    "fold": pa.array([i] * len(s), pa.int32()),
                    "clip_score": pa.array(list(s.values()), pa.float32()),
                }
            )
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp)
        ft = pq.read_table(path)
        keys += ft.column("key").to_pylist()
        folds += ft.column("fold").to_pylist()
        scores += ft.column("clip_score").to_pylist()
        times[f"score{i}_s"] = round(time.perf_counter() - t, 1)
    oof = pa.table(
        {"key": keys, "fold": pa.array(folds, pa.int32()), "clip_score": pa.array(scores, pa.float32())}
    )
    with atomic_path(out / "oof.parquet") as tmp:
        pq.write_table(oof, tmp)
    summary = {
        "k": cfg.k,
        "recipe": cfg.recipe,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "captions": cfg.captions,
        "rows": split["rows"],
        "scored": len(keys),
        "scorers": scorers,
        "oof": str(out / "oof.parquet"),
        "seconds": times,
    }
    write_json(out / "folds.json", summary)
    return summary


def merge_oof(scores_dir: str | Path, oof_path: str | Path, column: str = "clip_score") -> dict[str, Any]:
    """Put the out-of-fold scores into ``scores_dir/scores.parquet`` as ``column`` (atomically).

    An existing ``column`` computed by ``--model`` (in sample) is kept as ``{column}_model``. Keys the
    folds could not score (no caption, undecodable) get null, counted in the result."""
    path = Path(scores_dir) / "scores.parquet"
    table = pq.read_table(path)
    oof = pq.read_table(oof_path)
    by_key = dict(zip(oof.column("key").to_pylist(), oof.column("clip_score").to_pylist()))
    keys = table.column("key").to_pylist()
    vals = [by_key.get(k) for k in keys]
    fold = dict(zip(oof.column("key").to_pylist(), oof.column("fold").to_pylist()))
    names = table.column_names
    if column in names and f"{column}_model" not in names and "fold" not in names:
        table = table.rename_columns([f"{column}_model" if c == column else c for c in names])
    for name, arr in (
        (column, pa.array(vals, pa.float32())),
        ("fold", pa.array([fold.get(k) for k in keys], pa.int32())),
    ):
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return {
        "rows": len(keys),
        "scored": sum(v is not None for v in vals),
        "missing": sum(v is None for v in vals),
    }
