"""``clipforge curate fix``: recaption the pairs below the clip-score cut instead of dropping them.

Why: a low clip score on a good image usually means a bad *caption* (shuffled, alt-text junk), and
dropping the pair throws the image away with it. Recaptioning keeps the image with a caption that
describes it (the data papers: "Improving multimodal datasets with image captioning", VeCLIP,
LaCLIP). The captions come from ``clipforge caption run`` side tables (``caption_synthetic``, with
``clip_score_synthetic`` / ``clip_score_original`` under its scoring model); the honest setup is a
captioner trained out of fold (it never saw the pairs it recaptions: curate/folds.py), several tables
may be given (e.g. one per fold or per captioner) and the best-scoring caption of a key wins.

Per key, one action (``OUT/actions.parquet``: key, shard, action, reason, clip_score, caption,
caption_new, clip_score_new, source):

- ``dropped``: fails a ``--where`` expression (the same keep-rules as ``curate filter``: invalid or
  blank image, duplicate...), or is below the cut with no usable synthetic caption;
- ``recaptioned``: passes ``--where``, matches ``--fix`` (default ``clip_score < auto``: the mixture cut,
  no ground truth) and has a synthetic caption that its scoring model prefers to the original;
- ``kept``: everything else, byte for byte.

``--policy`` says what "a better caption" means:

- ``replace`` (default): the synthetic caption its side table's CLIPScore prefers to the original
  (``clip_score_synthetic > clip_score_original``); else the pair is dropped.
- ``compete``: the raw caption is one more candidate, all on the scale the cut was set on (the plain
  cosine: the table's out-of-fold ``clip_score`` for the raw caption, ``clip_cosine_*`` of ``caption run``
  for the synthetic ones, the best of its k candidates): the best wins if it clears the pair's cut
  (``auto``: the mixture cut of that row), the raw caption is kept if it wins, and the pair is dropped
  when neither raw nor synthetic clears the cut. Why: ~44% of the pairs below a label-free cut are clean
  (corrupted flickr8k, session 4), and a weak captioner's generic caption (CLIPScore clamps them all
  near 0) replaced their good captions; a synthetic caption that the same scorer would itself have cut
  is not a fix.

``OUT/weights.parquet`` (key, shard, pair_weight) gives every written pair a loss weight: 1 for a kept
pair, ``--recaption-weight`` for a recaptioned one; ``clipforge train --text-tables OUT/weights.parquet
--weight-column pair_weight`` uses it (train/textsource.py). Why: a weak captioner's caption is a worse
label than a kept raw caption. On corrupted flickr8k (2,000 clean pairs, session 7) 557 recaptioned
pairs at weight 1 cost t2i R@1 0.0096 against dropping them; at 0.3 (chosen on val) they add 0.001.

Fixed shards ``OUT/shards/PREFIX-STEM.tar`` (one per input shard, each written atomically, so a killed
run resumes at the next shard): kept samples as they were; a recaptioned one gets ``KEY.txt`` = the
new caption and ``KEY.json`` ``captions`` = [new caption], its originals kept under
``caption_original`` / ``captions_original`` (the trainer reads every JSON caption, so a shuffled
pair's five wrong captions must not stay there).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.curate.filter import FilterError, apply_filters, columns_of, parse
from clipforge.curate.outputs import prepare_output
from clipforge.curate.reshard import load_run
from clipforge.data.report import BadSampleReport
from clipforge.data.shards import shard_name
from clipforge.utils import atomic_path, write_json

log = logging.getLogger(__name__)

DEFAULT_FIX = "clip_score < auto"
# The keep-rules of the README recipe that do not involve the clip score (applied when their columns exist).
DEFAULT_WHERE = ("image_valid and not is_blank", "not is_duplicate", "not is_eval_duplicate")
ACTIONS = ("kept", "recaptioned", "dropped")
POLICIES = ("replace", "compete")
CONFIG = "fix_config.json"
WEIGHTS = "weights.parquet"


def _best_candidate(cols: dict[str, list[Any]], i: int) -> tuple[str | None, float | None]:
    """The candidate of row ``i`` with the best plain cosine (``caption_candidates`` +
    ``clip_cosine_candidates``), else the row's ``caption_synthetic`` and ``clip_cosine_synthetic``."""
    cands, cos = cols.get("caption_candidates"), cols.get("clip_cosine_candidates")
    if cands is not None and cos is not None and cands[i] and cos[i]:
        ok = [(c, t) for t, c in zip(cands[i], cos[i]) if isinstance(t, str) and t.strip() and c is not None]
        if ok:
            c, t = max(ok, key=lambda x: x[0])
            return t, float(c)
    cap = cols["caption_synthetic"][i]
    c = cols["clip_cosine_synthetic"][i] if "clip_cosine_synthetic" in cols else None
    return cap, c


def load_captions(paths: list[str | Path], by: str = "clip_score") -> dict[str, dict[str, Any]]:
    """key -> the best synthetic caption over all side tables (by ``clip_score_synthetic``, else first;
    ``by="cosine"``: the candidate with the best plain cosine, ``clip_cosine_*``, kept as ``cosine``).

    ``paths``: ``caption run`` output dirs (their ``captions/*.parquet``) or Parquet files."""
    best: dict[str, dict[str, Any]] = {}
    for p in paths:
        p = Path(p)
        files = sorted((p / "captions").glob("*.parquet")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no caption side table at {p} (a `clipforge caption run` output dir)")
        for f in files:
            t = pq.read_table(f)
            if "key" not in t.column_names or "caption_synthetic" not in t.column_names:
                raise ValueError(f"{f} is not a caption side table (needs key and caption_synthetic columns)")
            if by == "cosine" and "clip_cosine_synthetic" not in t.column_names:
                raise ValueError(
                    f"{f} has no clip_cosine_synthetic column (plain cosines): rerun `clipforge caption run`"
                )
            skip = "" if by == "cosine" else "caption_cand"
            cols = {c: t.column(c).to_pylist() for c in t.column_names if not (skip and c.startswith(skip))}
            n = t.num_rows
            for i in range(n):
                cap, cos = (
                    _best_candidate(cols, i) if by == "cosine" else (cols["caption_synthetic"][i], None)
                )
                if not isinstance(cap, str) or not cap.strip():
                    continue
                new = cols.get("clip_score_synthetic", [None] * n)[i] if by != "cosine" else cos
                row = {
                    "caption": " ".join(cap.split()),
                    "score": new,
                    "score_original": cols.get("clip_score_original", [None] * n)[i],
                    "source": str(f),
                }
                old = best.get(cols["key"][i])
                if old is None or (new is not None and (old["score"] is None or new > old["score"])):
                    best[cols["key"][i]] = row
    return best


def decide(
    table: pa.Table,
    captions: dict[str, dict[str, Any]],
    where: list[str],
    fix: str,
    require_better: bool = True,
    policy: str = "replace",
) -> dict[str, list[Any]]:
    """The action, reason and new caption of every row of the score table (no file is touched).

    ``policy="compete"``: ``captions`` scored by plain cosine (:func:`load_captions` ``by="cosine"``),
    ``fix`` an ``auto`` cut; see the module doc."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "compete" and "auto" not in fix:
        raise ValueError(
            f"--policy compete compares captions with the mixture cut: --fix needs auto, got {fix!r}"
        )
    keys = table.column("key").to_pylist()
    n = len(keys)
    dropped_by: list[str | None] = [None] * n
    for e in where:
        m, _ = apply_filters(table, [e])
        for i in np.flatnonzero(~m):
            dropped_by[i] = dropped_by[i] or f"fails {e!r}"
    bad, _ = apply_filters(table, [fix])
    score = table.column("clip_score").to_pylist() if "clip_score" in table.column_names else [None] * n
    caps = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * n
    cut = None
    if "auto" in fix:
        from clipforge.curate.threshold import table_auto_threshold

        col = sorted(c for c in columns_of(parse(fix)))[0]
        cut = table_auto_threshold(table, col)["cuts"]
    out: dict[str, list[Any]] = {
        c: [] for c in ("action", "reason", "caption_new", "clip_score_new", "source")
    }
    for i, k in enumerate(keys):
        action, reason, new = "kept", "", None
        if dropped_by[i]:
            action, reason = "dropped", dropped_by[i]
        elif bad[i]:
            why = f"{fix}" + (
                f" (score {score[i]:.4f} < cut {cut[i]:.4f})"
                if cut is not None and score[i] is not None
                else ""
            )
            new = captions.get(k)
            if new is None:
                action, reason = "dropped", f"{why}; no synthetic caption"
            elif policy == "compete":
                raw = score[i] if score[i] is not None else -np.inf
                syn = new["score"] if new["score"] is not None else -np.inf
                if max(raw, syn) < cut[i]:
                    action, reason, new = "dropped", f"{why}; neither raw nor synthetic clears the cut", None
                elif raw >= syn:
                    action, reason, new = "kept", f"{why}; the raw caption scores best", None
                else:
                    action, reason = "recaptioned", f"{why}; synthetic {syn:.4f} clears the cut"
            elif (
                require_better
                and new["score"] is not None
                and new["score_original"] is not None
                and new["score"] <= new["score_original"]
            ):
                action, reason, new = (
                    "dropped",
                    f"{why}; synthetic caption scores no better than the original",
                    None,
                )
            else:
                action, reason = "recaptioned", why
        out["action"].append(action)
        out["reason"].append(reason)
        out["caption_new"].append(new["caption"] if new else None)
        out["clip_score_new"].append(new["score"] if new else None)
        out["source"].append(new["source"] if new else None)
    return {"key": keys, "caption": caps, "clip_score": score, **out}


def replace_caption(s: dict[str, Any], new: str, **meta: Any) -> dict[str, Any]:
    """The raw sample ``s`` with KEY.txt = ``new`` and KEY.json ``captions`` = [new] (a trainer reads every
    JSON caption), its originals kept in KEY.json as ``caption_original`` (KEY.txt) and
    ``captions_original`` (the JSON list), then ``meta``'s entries. Shared by ``curate fix`` and
    ``caption run --write-shards``."""
    from clipforge.data.decode import TEXT_EXTS

    try:
        info = json.loads(s["json"].decode("utf-8")) if "json" in s else {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        info = {}
    info = info if isinstance(info, dict) else {"json_original": info}
    old = next((s[e] for e in TEXT_EXTS if e in s), None)
    if isinstance(old, bytes):
        old = old.decode("utf-8", "replace")
    info["caption_original"] = old
    if "captions" in info:
        info["captions_original"] = info["captions"]
    info["captions"] = [new]
    info.update(meta)
    out = {k: v for k, v in s.items() if not k.startswith("__") and k not in TEXT_EXTS and k != "json"}
    out.update({"__key__": s["__key__"], "txt": new, "json": json.dumps(info)})
    return out


def fixed_shard_name(prefix: str, url: str) -> str:
    """``PREFIX-STEM.tar``: the fixed shard written for input shard ``url``."""
    return f"{prefix}-{shard_name(url).removesuffix('.tar')}.tar"


def write_fixed_shard(url: str, rows: dict[str, dict[str, Any]], out: Path, prefix: str) -> dict[str, Any]:
    """One input shard -> ``out/shards/PREFIX-STEM.tar`` (atomic); returns counts and bad samples."""
    from clipforge.data.reader import iter_tar_samples
    from clipforge.data.writer import ShardWriter

    stem = shard_name(url).removesuffix(".tar")
    final = out / "shards" / fixed_shard_name(prefix, url)
    report = BadSampleReport()
    written = {"kept": 0, "recaptioned": 0}
    tmp_dir = out / "shards" / f".{stem}.tmp"
    import shutil

    shutil.rmtree(tmp_dir, ignore_errors=True)
    with ShardWriter(tmp_dir / "part-%06d.tar", maxcount=10**9, maxsize=1e15, side_table=False) as w:
        for s in iter_tar_samples(url, report):
            r = rows.get(s["__key__"])
            if r is None or r["action"] == "dropped":
                continue
            if r["action"] == "recaptioned":
                w.write(replace_caption(s, r["caption_new"], caption_fixed=True))
            else:
                w.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
            written[r["action"]] += 1
    parts = sorted(tmp_dir.glob("*.tar"))
    if parts:
        parts[0].replace(final)  # the rename marks the shard done (a resume skips it)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"shard": str(final) if parts else None, **written, "bad": report.to_dict()}


def fix_run(
    scores_dir: str | Path,
    captions: list[str | Path],
    output: str | Path,
    *,
    where: list[str] | None = None,
    fix: str = DEFAULT_FIX,
    require_better: bool = True,
    policy: str = "replace",
    prefix: str = "fixed",
    recaption_weight: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Decide an action per key, write ``OUT/actions.parquet``, ``OUT/weights.parquet`` and the fixed
    shards; resumable.

    ``where`` (keep-rules, default: the recipe's non-clip rules whose columns exist) and ``fix`` are
    ``curate filter`` expressions. Rerunning into the same ``output`` with the same settings resumes
    (finished shards are skipped); other settings are refused unless ``overwrite``."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", prefix):
        raise ValueError(
            f"--prefix must be a plain file-name part (letters, digits, _ . -), got {prefix[:100]!r}"
        )
    if not (np.isfinite(recaption_weight) and recaption_weight >= 0):
        raise ValueError(f"--recaption-weight must be a finite number >= 0, got {recaption_weight}")
    table, manifest = load_run(scores_dir)
    where, skipped_where = _rules(table, where, fix, scores_dir)
    caption_paths = [str(Path(p)) for p in captions]
    settings = {
        "scores": str(Path(scores_dir).resolve()),
        "captions": [str(Path(p).resolve()) for p in caption_paths],
        "where": list(where),
        "fix": fix,
        "require_better": require_better,
        "prefix": prefix,
    }
    if policy != "replace":  # recorded only when set: a resume of an older run compares equal
        settings["policy"] = policy
    if recaption_weight != 1.0:
        settings["recaption_weight"] = recaption_weight
    urls = manifest["urls"]
    if not urls:
        raise FileNotFoundError(f"{scores_dir}/manifest.json lists no input shards")
    inputs = [Path(scores_dir) / "scores.parquet", *urls, *caption_paths]
    out = _prepare(Path(output), settings, overwrite, inputs)
    cap = load_captions(caption_paths, by="cosine" if policy == "compete" else "clip_score")
    d = decide(table, cap, where, fix, require_better, policy)
    shards = table.column("shard").to_pylist() if "shard" in table.column_names else [""] * table.num_rows
    d = {"key": d["key"], "shard": shards, **{k: v for k, v in d.items() if k != "key"}}
    _write_actions(out, d)
    by_key = {k: {"action": a, "caption_new": c} for k, a, c in zip(d["key"], d["action"], d["caption_new"])}
    written, resumed, counts_written, report = _write_shards(urls, by_key, out, prefix, progress)
    _write_weights(out, d, prefix, recaption_weight)
    counts = {a: int(sum(x == a for x in d["action"])) for a in ACTIONS}
    summary = {
        "scores": str(scores_dir),
        "output": str(out),
        "rows": table.num_rows,
        "actions": counts,
        "dropped_by": _dropped_by(d),
        "where": where,
        "where_skipped_no_column": skipped_where,
        "fix": fix,
        "policy": policy,
        "synthetic_captions": len(cap),
        "recaption_weight": recaption_weight,
        "train_weights": f"--text-tables {out / WEIGHTS} --weight-column pair_weight",
        "shards": written,
        "shards_resumed": resumed,
        "written": counts_written,
        "bad_samples": report.to_dict()["counts"],
    }
    if counts_written["kept"] + counts_written["recaptioned"] != counts["kept"] + counts["recaptioned"]:
        log.warning("decided %s but wrote %s (see bad_samples)", counts, counts_written)
    write_json(out / "fix.json", summary)
    return summary


def _rules(
    table: pa.Table, where: list[str] | None, fix: str, scores_dir: str | Path
) -> tuple[list[str], list[str]]:
    """The keep-rules (default: the recipe's rules whose columns exist) and those skipped; every rule
    and ``fix`` must name columns the scores table has."""
    skipped: list[str] = []
    if where is None:
        where = []
        for e in DEFAULT_WHERE:
            (where if columns_of(parse(e)) <= set(table.column_names) else skipped).append(e)
    for e in [*where, fix]:
        missing = columns_of(parse(e)) - set(table.column_names)
        if missing:
            raise FilterError(
                f"{e!r} needs column(s) {sorted(missing)} that {scores_dir}/scores.parquet lacks"
            )
    return where, skipped


def _prepare(out: Path, settings: dict[str, Any], overwrite: bool, inputs: list[Any]) -> Path:
    """Resume only with the same settings; write them first (the record a resume is checked against)."""
    resume = (out / CONFIG).is_file() and not overwrite
    if resume:
        saved = json.loads((out / CONFIG).read_text())
        if saved != settings:
            diff = [k for k in settings if saved.get(k) != settings[k]]
            raise ValueError(
                f"{out} holds a fix run with other settings ({', '.join(diff)}): use --overwrite"
            )
    out = prepare_output(out, overwrite=overwrite, resume=resume, inputs=inputs)
    write_json(out / CONFIG, settings)
    return out


def _write_actions(out: Path, d: dict[str, list[Any]]) -> None:
    actions = pa.table(
        {
            **{k: d[k] for k in ("key", "shard", "action", "reason", "caption", "caption_new", "source")},
            "clip_score": pa.array(d["clip_score"], pa.float32()),
            "clip_score_new": pa.array(d["clip_score_new"], pa.float32()),
        }
    )
    with atomic_path(out / "actions.parquet") as tmp:
        pq.write_table(actions, tmp)


def _write_weights(out: Path, d: dict[str, list[Any]], prefix: str, recaption_weight: float) -> None:
    """``OUT/weights.parquet``: key, shard (the fixed shard's name), pair_weight (1 kept, the recaption
    weight recaptioned) of every written pair (see the module doc)."""
    keep = [i for i, a in enumerate(d["action"]) if a in ("kept", "recaptioned")]
    # "" where the score table has no shard column (the trainer then matches by key alone)
    shards = [fixed_shard_name(prefix, d["shard"][i]) if d["shard"][i] else "" for i in keep]
    weights = [recaption_weight if d["action"][i] == "recaptioned" else 1.0 for i in keep]
    t = pa.table(
        {
            "key": [d["key"][i] for i in keep],
            "shard": shards,
            "pair_weight": pa.array(weights, pa.float32()),
        }
    )
    with atomic_path(out / WEIGHTS) as tmp:
        pq.write_table(t, tmp)


def _write_shards(
    urls: list[str], by_key: dict[str, dict[str, Any]], out: Path, prefix: str, progress: bool
) -> tuple[list[str], int, dict[str, int], BadSampleReport]:
    """One fixed shard per input shard; a shard whose record exists is done (resume skips it)."""
    from tqdm import tqdm

    (out / "shards").mkdir(exist_ok=True)
    written: list[str] = []
    report = BadSampleReport()
    resumed = 0
    counts = {"kept": 0, "recaptioned": 0}
    for url in tqdm(urls, desc="curate fix", unit="shard", disable=not progress):
        stem = shard_name(url).removesuffix(".tar")
        done = out / "shards" / f"{prefix}-{stem}.json"
        if done.is_file():
            r = json.loads(done.read_text())
            resumed += 1
        else:
            r = write_fixed_shard(url, by_key, out, prefix)
            write_json(done, r)
        report.merge(r["bad"])
        for a in counts:
            counts[a] += r[a]
        if r["shard"]:
            written.append(r["shard"])
    return written, resumed, counts, report


def _dropped_by(d: dict[str, list[Any]]) -> dict[str, int]:
    """Why pairs were dropped, counted (the per-row numbers stay in actions.parquet)."""
    reasons: dict[str, int] = {}
    for a, why in zip(d["action"], d["reason"]):
        if a == "dropped":
            why = re.sub(r" \(score [^)]*\)", "", why)
            reasons[why] = reasons.get(why, 0) + 1
    return reasons
