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

Score and caption tables and shards are untrusted: every input is checked (missing or same-named
shards, an ``--output`` holding an input, unreadable or mistyped tables) before ``OUT`` is touched; a
caption row with a blank caption or a NaN/inf score, and a sample that is repeated, has no score row or
is lost to damage, is skipped and counted by key (``fix.json``: ``caption_rows_skipped``,
``bad_samples``, ``bad_sample_keys``); ``weights.parquet`` lists only pairs that were written. A shard
is resumed only if its record was made from the same decisions (a changed input redoes it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import ChainMap, Counter
from collections.abc import Mapping
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


def _finite(v: Any) -> float | None:
    """``v`` as a float, None when null, NaN or infinite (a failed score is no score, never a winner)."""
    return float(v) if v is not None and math.isfinite(v) else None


def _best_candidate(cols: dict[str, list[Any]], i: int) -> tuple[str | None, float | None]:
    """The candidate of row ``i`` with the best plain cosine (``caption_candidates`` +
    ``clip_cosine_candidates``), else the row's ``caption_synthetic`` and ``clip_cosine_synthetic``.
    Candidate lists of different lengths are not paired (which cosine is whose is unknown)."""
    cands, cos = cols.get("caption_candidates"), cols.get("clip_cosine_candidates")
    if cands is not None and cos is not None and cands[i] and cos[i] and len(cands[i]) == len(cos[i]):
        ok = [(_finite(c), t) for t, c in zip(cands[i], cos[i]) if isinstance(t, str) and t.strip()]
        ok = [(c, t) for c, t in ok if c is not None]
        if ok:
            c, t = max(ok, key=lambda x: x[0])
            return t, c
    cap = cols["caption_synthetic"][i]
    c = cols["clip_cosine_synthetic"][i] if "clip_cosine_synthetic" in cols else None
    return cap, c


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


def _check_columns(f: Path, t: pa.Table, by: str) -> None:
    """Score columns must hold numbers (a string score would be compared with a float mid-run)."""
    used = ["clip_score_synthetic", "clip_score_original"]
    used += ["clip_cosine_synthetic", "clip_cosine_candidates"] if by == "cosine" else []
    for c in used:
        if c not in t.column_names:
            continue
        typ = t.schema.field(c).type
        if c.endswith("candidates") and (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
            typ = typ.value_type
        if not _numeric(typ):
            raise ValueError(f"{f}: column {c} must hold numbers, got {t.schema.field(c).type}")


def caption_files(paths: list[str | Path]) -> list[Path]:
    """The side-table Parquet files of ``caption run`` output dirs (``captions/*.parquet``) or files."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        files = sorted((p / "captions").glob("*.parquet")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"no caption side table at {p} (a `clipforge caption run` output dir)")
        out.extend(files)
    return out


def load_captions(
    paths: list[str | Path], by: str = "clip_score", report: BadSampleReport | None = None
) -> dict[str, dict[str, Any]]:
    """key -> the best synthetic caption over all side tables (by ``clip_score_synthetic``, else first;
    ``by="cosine"``: the candidate with the best plain cosine, ``clip_cosine_*``, kept as ``cosine``).

    ``paths``: ``caption run`` output dirs (their ``captions/*.parquet``) or Parquet files. A duplicate
    key keeps its best-scoring row (the first on a tie). Rows without a usable caption or key, or whose
    score is NaN/inf (the scorer failed), are skipped and counted in ``report``."""
    best: dict[str, dict[str, Any]] = {}
    report = report if report is not None else BadSampleReport()
    for f in caption_files(paths):
        try:
            t = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{f} is not a readable Parquet table: {e}") from None
        if "key" not in t.column_names or "caption_synthetic" not in t.column_names:
            raise ValueError(f"{f} is not a caption side table (needs key and caption_synthetic columns)")
        if by == "cosine" and "clip_cosine_synthetic" not in t.column_names:
            raise ValueError(
                f"{f} has no clip_cosine_synthetic column (plain cosines): rerun `clipforge caption run`"
            )
        _check_columns(f, t, by)
        skip = "" if by == "cosine" else "caption_cand"
        cols = {c: t.column(c).to_pylist() for c in t.column_names if not (skip and c.startswith(skip))}
        n = t.num_rows
        for i in range(n):
            key = cols["key"][i]
            cap, raw = (
                _best_candidate(cols, i)
                if by == "cosine"
                else (cols["caption_synthetic"][i], cols.get("clip_score_synthetic", [None] * n)[i])
            )
            if not isinstance(key, str) or not key:
                report.add(f"{f.name}:row {i}", "bad_key")
                continue
            cands, cos = cols.get("caption_candidates"), cols.get("clip_cosine_candidates")
            if cands and cos and cands[i] is not None and cos[i] is not None and len(cands[i]) != len(cos[i]):
                report.add(
                    key, "candidate_lengths_differ", f"{len(cands[i])} captions, {len(cos[i])} cosines"
                )
            if not isinstance(cap, str) or not cap.strip():
                report.add(key, "blank_caption")
                continue
            new = _finite(raw)
            if raw is not None and new is None:
                report.add(key, "non_finite_score", f"{raw}")
                continue
            row = {
                "caption": " ".join(cap.split()),
                "score": new,
                "score_original": _finite(cols.get("clip_score_original", [None] * n)[i]),
                "source": str(f),
            }
            old = best.get(key)
            if old is None or (new is not None and (old["score"] is None or new > old["score"])):
                best[key] = row
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
    autos = _auto_columns(parse(fix))
    if policy == "compete" and autos != {"clip_score"}:
        raise ValueError(
            "--policy compete compares captions with the mixture cut of clip_score: --fix needs "
            f"'clip_score < auto', got {fix!r}"
        )
    if "key" not in table.column_names:
        raise ValueError(
            f"the score table has no key column (columns: {', '.join(table.column_names)[:300]})"
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
    cut, col, val = None, "", score
    if autos:  # the cut of the column compared with auto (not of whatever column sorts first)
        from clipforge.curate.threshold import table_auto_threshold

        col = sorted(autos)[0]
        cut = table_auto_threshold(table, col)["cuts"]
        val = table.column(col).to_pylist()
    out: dict[str, list[Any]] = {
        c: [] for c in ("action", "reason", "caption_new", "clip_score_new", "source")
    }
    for i, k in enumerate(keys):
        action, reason, new = "kept", "", None
        if dropped_by[i]:
            action, reason = "dropped", dropped_by[i]
        elif bad[i]:
            why = f"{fix}" + (
                f" (score {val[i]:.4f} < cut {cut[i]:.4f})" if cut is not None and val[i] is not None else ""
            )
            new = captions.get(k)
            if new is None:
                action, reason = "dropped", f"{why}; no synthetic caption"
            elif policy == "compete":
                raw = _finite(score[i])
                raw = raw if raw is not None else -np.inf
                syn = new["score"] if new["score"] is not None else -np.inf
                if not max(raw, syn) >= cut[i]:  # a NaN cut (no finite score) is never cleared
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
        elif cut is not None and not np.isfinite(cut[i]):
            reason = f"no finite {col}: not judged by the auto cut"
        out["action"].append(action)
        out["reason"].append(reason)
        out["caption_new"].append(new["caption"] if new else None)
        out["clip_score_new"].append(new["score"] if new else None)
        out["source"].append(new["source"] if new else None)
    return {"key": keys, "caption": caps, "clip_score": score, **out}


def _auto_columns(node: tuple) -> set[str]:
    """The columns compared with ``auto`` in a parsed filter expression."""
    if node[0] == "auto":
        return {node[2]}
    if node[0] == "not":
        return _auto_columns(node[1])
    if node[0] in ("and", "or"):
        return set().union(*(_auto_columns(c) for c in node[1]))
    return set()


def replace_caption(s: dict[str, Any], new: str, **meta: Any) -> dict[str, Any]:
    """The raw sample ``s`` with KEY.txt = ``new`` and KEY.json ``captions`` = [new] (a trainer reads every
    JSON caption), its originals kept in KEY.json as ``caption_original`` (KEY.txt) and
    ``captions_original`` (the JSON list), then ``meta``'s entries. Shared by ``curate fix`` and
    ``caption run --write-shards``."""
    from clipforge.data.decode import TEXT_EXTS

    raw = s.get("json", b"{}")
    raw = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (or nested past Python's stack): kept as text
        info = raw
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


def write_fixed_shard(url: str, rows: Mapping[str, dict[str, Any]], out: Path, prefix: str) -> dict[str, Any]:
    """One input shard -> ``out/shards/PREFIX-STEM.tar`` (atomic); returns counts, the written keys and
    the bad samples. ``rows``: key -> decision of this shard's pairs. A sample without a decision, a
    repeated key or a sample the writer refuses is skipped and reported, never a crash mid-run."""
    import shutil

    from clipforge.data.reader import iter_tar_samples
    from clipforge.data.writer import ShardWriter

    name = shard_name(url)
    final = out / "shards" / fixed_shard_name(prefix, url)
    report = BadSampleReport()
    written = {"kept": 0, "recaptioned": 0}
    keys: list[str] = []
    seen: set[str] = set()
    tmp_dir = out / "shards" / f".{name.removesuffix('.tar')}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    with ShardWriter(tmp_dir / "part-%06d.tar", maxcount=10**9, maxsize=1e15, side_table=False) as w:
        for s in iter_tar_samples(url, report):
            k = s["__key__"]
            r = rows.get(k)
            if r is None:
                report.add(f"{name}:{k}", "not_in_scores")
                continue
            if k in seen:
                report.add(f"{name}:{k}", "duplicate_key")
                continue
            seen.add(k)
            if r["action"] == "dropped":
                continue
            if r["action"] == "recaptioned":
                sample = replace_caption(s, r["caption_new"], caption_fixed=True)
            else:
                sample = {m: v for m, v in s.items() if not m.startswith("__") or m == "__key__"}
            try:
                w.write(sample)
            except ValueError as e:
                report.add(f"{name}:{k}", "unwritable_sample", str(e)[:200])
                continue
            written[r["action"]] += 1
            keys.append(k)
    parts = sorted(tmp_dir.glob("*.tar"))
    if parts:
        parts[0].replace(final)  # the rename marks the shard done (a resume skips it)
    else:
        final.unlink(missing_ok=True)  # a redone shard that now writes nothing leaves no stale tar
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"shard": str(final) if parts else None, **written, "keys": keys, "bad": report.to_dict()}


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
    (finished shards are skipped); other settings are refused unless ``overwrite``. Every input is read
    and every decision made before ``output`` is touched."""
    from clipforge.data.shards import is_remote

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", prefix):
        raise ValueError(
            f"--prefix must be a plain file-name part (letters, digits, _ . -), got {prefix[:100]!r}"
        )
    if not (np.isfinite(recaption_weight) and recaption_weight >= 0):
        raise ValueError(f"--recaption-weight must be a finite number >= 0, got {recaption_weight}")
    table, manifest = load_run(scores_dir)
    if "clip_score" in table.column_names and not _numeric(table.schema.field("clip_score").type):
        raise ValueError(f"{scores_dir}/scores.parquet: clip_score must hold numbers")
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
    gone = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if gone:
        raise FileNotFoundError(
            f"{len(gone)} of {len(urls)} input shards in {scores_dir}/manifest.json are missing (moved or "
            f"deleted?), e.g. {gone[0][:200]}"
        )
    names = Counter(fixed_shard_name(prefix, u) for u in urls)
    clash = [u[:200] for u in urls if names[fixed_shard_name(prefix, u)] > 1]
    if clash:  # they would share one fixed shard and its done-record: the second would be lost
        raise ValueError(f"input shards share a file name: {', '.join(clash[:4])}")
    cap_report = BadSampleReport()
    cap = load_captions(
        caption_paths, by="cosine" if policy == "compete" else "clip_score", report=cap_report
    )
    d = decide(table, cap, where, fix, require_better, policy)
    shards = table.column("shard").to_pylist() if "shard" in table.column_names else [""] * table.num_rows
    shards = [s if isinstance(s, str) else "" for s in shards]  # a null shard: matched by key alone
    d = {"key": d["key"], "shard": shards, **{k: v for k, v in d.items() if k != "key"}}
    inputs = [Path(scores_dir) / "scores.parquet", Path(scores_dir) / "manifest.json", *urls]
    out = _prepare(Path(output), settings, overwrite, [*inputs, *caption_files(caption_paths)])
    _write_actions(out, d)
    written, resumed, counts_written, report, pairs = _write_shards(urls, d, out, prefix, progress)
    missing = _write_weights(out, d, prefix, recaption_weight, pairs)
    for k in missing:
        report.add(k, "missing_from_shards")
    counts = {a: int(sum(x == a for x in d["action"])) for a in ACTIONS}
    summary = {
        "scores": str(scores_dir),
        "output": str(out),
        "rows": table.num_rows,
        "actions": counts,
        "dropped_by": _dropped_by(d),
        "kept_unjudged": sum(
            a == "kept" and r.startswith("no finite") for a, r in zip(d["action"], d["reason"])
        ),
        "where": where,
        "where_skipped_no_column": skipped_where,
        "fix": fix,
        "policy": policy,
        "synthetic_captions": len(cap),
        "synthetic_captions_unmatched": len(set(cap) - set(d["key"])),
        "caption_rows_skipped": cap_report.to_dict()["counts"],
        "recaption_weight": recaption_weight,
        "train_weights": f"--text-tables {out / WEIGHTS} --weight-column pair_weight",
        "shards": written,
        "shards_resumed": resumed,
        "written": counts_written,
        "bad_samples": report.to_dict()["counts"],
        "bad_sample_keys": report.to_dict()["keys"],
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
        try:
            saved = json.loads((out / CONFIG).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            saved = None
        if not isinstance(saved, dict):
            raise ValueError(f"{out / CONFIG} is unreadable: use --overwrite or another --output")
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


def _write_weights(
    out: Path, d: dict[str, list[Any]], prefix: str, recaption_weight: float, pairs: set[tuple[str, str]]
) -> list[str]:
    """``OUT/weights.parquet``: key, shard (the fixed shard's name), pair_weight (1 kept, the recaption
    weight recaptioned) of every pair in ``pairs`` (written: fixed shard name, key; see the module doc).
    Returns the keys decided kept or recaptioned that no shard held (they get no weight row)."""
    written_keys = {k for _, k in pairs}
    keep, missing = [], []
    for i, a in enumerate(d["action"]):
        if a not in ("kept", "recaptioned"):
            continue
        # "" where the score table has no shard column (the trainer then matches by key alone)
        shard = fixed_shard_name(prefix, d["shard"][i]) if d["shard"][i] else ""
        if (shard, d["key"][i]) in pairs or (not shard and d["key"][i] in written_keys):
            keep.append((i, shard))
        else:
            missing.append(f"{d['shard'][i] or ''}:{d['key'][i]}")
    t = pa.table(
        {
            "key": [d["key"][i] for i, _ in keep],
            "shard": [s for _, s in keep],
            "pair_weight": pa.array(
                [recaption_weight if d["action"][i] == "recaptioned" else 1.0 for i, _ in keep], pa.float32()
            ),
        }
    )
    with atomic_path(out / WEIGHTS) as tmp:
        pq.write_table(t, tmp)
    return missing


def _decisions_by_shard(d: dict[str, list[Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """input shard name ("" for rows without one) -> key -> decision: a key is looked up in its own
    shard, so one key in two shards never takes the other's action."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for k, s, a, c in zip(d["key"], d["shard"], d["action"], d["caption_new"]):
        if not isinstance(k, str):  # a null key names no sample (it is reported as missing)
            continue
        by.setdefault(shard_name(s) if s else "", {})[k] = {"action": a, "caption_new": c}
    return by


def _write_shards(
    urls: list[str], d: dict[str, list[Any]], out: Path, prefix: str, progress: bool
) -> tuple[list[str], int, dict[str, int], BadSampleReport, set[tuple[str, str]]]:
    """One fixed shard per input shard. A shard is done (a resume skips it) when its record and tar
    exist and were made from the same decisions (changed inputs redo it); an unreadable shard gets no
    record (a resume retries it). Also returns the written (fixed shard name, key) pairs."""
    from tqdm import tqdm

    (out / "shards").mkdir(exist_ok=True)
    by_shard = _decisions_by_shard(d)
    digests = {
        g: hashlib.sha256(json.dumps(sorted(r.items())).encode()).hexdigest() for g, r in by_shard.items()
    }
    written: list[str] = []
    report = BadSampleReport()
    resumed = 0
    counts = {"kept": 0, "recaptioned": 0}
    pairs: set[tuple[str, str]] = set()
    for url in tqdm(urls, desc="curate fix", unit="shard", disable=not progress):
        # the shard's own rows, then rows without a shard (the table may have no shard column)
        rows = ChainMap(by_shard.get(shard_name(url), {}), by_shard.get("", {}))
        digest = f"{digests.get(shard_name(url))}/{digests.get('')}"
        final = out / "shards" / fixed_shard_name(prefix, url)
        done = final.with_suffix(".json")
        r = _read_record(done)
        if r is not None and r["decisions"] == digest and (r["shard"] is None or final.is_file()):
            resumed += 1
        else:
            r = {**write_fixed_shard(url, rows, out, prefix), "decisions": digest}
            if "unreadable_shard" not in r["bad"]["counts"]:
                write_json(done, r)
        report.merge(r["bad"])
        for a in counts:
            counts[a] += r[a]
        if r["shard"]:
            written.append(str(final))
            pairs.update((final.name, k) for k in r["keys"])
    return written, resumed, counts, report, pairs


def _read_record(path: Path) -> dict[str, Any] | None:
    """A shard's done-record, None when absent or unreadable (the shard is then written again)."""
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fields = {"shard": (str, type(None)), "kept": int, "recaptioned": int, "keys": list, "bad": dict}
    ok = isinstance(r, dict) and "decisions" in r and all(isinstance(r.get(f), t) for f, t in fields.items())
    return r if ok else None


def _dropped_by(d: dict[str, list[Any]]) -> dict[str, int]:
    """Why pairs were dropped, counted (the per-row numbers stay in actions.parquet)."""
    reasons: dict[str, int] = {}
    for a, why in zip(d["action"], d["reason"]):
        if a == "dropped":
            why = re.sub(r" \(score [^)]*\)", "", why)
            reasons[why] = reasons.get(why, 0) + 1
    return reasons
