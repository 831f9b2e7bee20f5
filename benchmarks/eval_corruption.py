"""Corruption benchmarks: (1) zero-shot robustness curves of models under in-process image corruptions,
(2) precision / recall of curation filters at catching the faults injected by make_corrupted_flickr.py.

    python benchmarks/eval_corruption.py --model M1 --model M2 --output runs/robustness --limit 1000
    python benchmarks/eval_corruption.py --scores /tmp/flk-scores --faults /tmp/flk-corrupt/faults.json

(1) is ``clipforge eval robustness`` (evaluate/robustness.py) once per model, into OUTPUT/<n>/ (JSON +
PNG curve each), and one table: CIFAR-10 zero-shot top-1 clean and at severities 1-3 of Gaussian noise,
blur, JPEG and contrast.

For each fault type, the filter that should catch it (all from ``OUT/scores.parquet``, no rescoring):

- blank images        -> ``is_blank``
- exact duplicates    -> ``exact_dup_of``  (a pair is caught when both land in one group: same kept key)
- near duplicates     -> ``near_dup_of`` (pHash) or ``semantic_dup_of`` (SemDeDup on embeddings)
- shuffled captions   -> ``clip_score bottom P%`` with P = the injected share (needs a *trained* scorer)

Precision = flagged rows that are faults of that type / flagged rows; recall = caught / injected.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pyarrow.parquet as pq

from clipforge.curate.filter import evaluate, parse
from clipforge.utils import emit_json, format_table


def pair_scores(t, columns: list[str], pairs: dict[str, str], dup_keys: set[str]) -> dict:
    """A planted pair (copy -> original) is caught when some ``*_dup_of`` column puts both in one group
    (same kept key); precision counts flagged rows that are planted duplicates (or blanks)."""
    keys = t.column("key").to_pylist()
    caught: set[str] = set()
    flagged: set[str] = set()
    for c in columns:
        of = dict(zip(keys, t.column(c).to_pylist()))
        flagged |= {k for k, v in of.items() if v is not None}
        caught |= {cp for cp, o in pairs.items() if (of.get(cp) or cp) == (of.get(o) or o)}
    tp = len(flagged & dup_keys)
    return {
        "injected": len(pairs),
        "flagged": len(flagged),
        "recall": len(caught) / max(1, len(pairs)),
        "precision": tp / max(1, len(flagged)),
    }


def evaluate_faults(scores_dir: str, faults_path: str, shuffle_pct: float | None = None) -> dict:
    t = pq.read_table(f"{scores_dir}/scores.parquet")
    f = json.loads(open(faults_path).read())
    keys = t.column("key").to_pylist()
    cols = set(t.column_names)

    def flags(expr: str) -> dict[str, bool]:
        m = evaluate(parse(expr), t).to_numpy(zero_copy_only=False)
        return dict(zip(keys, m.tolist()))

    out: dict = {"rows": t.num_rows}
    blank = set(f["blank"])
    if "is_blank" in cols:
        fl = flags("is_blank")
        flagged = {k for k, v in fl.items() if v}
        out["blank"] = {
            "injected": len(blank),
            "flagged": len(flagged),
            "recall": len(flagged & blank) / max(1, len(blank)),
            "precision": len(flagged & blank) / max(1, len(flagged)),
        }
    groups = {"exact_dup": ["exact_dup_of"], "near_dup": ["near_dup_of", "semantic_dup_of"]}
    all_dup = {k for kind in ("exact_dup", "near_dup") for pair in f[kind].items() for k in pair}
    for kind, names in groups.items():
        names = [c for c in names if c in cols]
        if names:  # blanks are near-duplicates of each other: flagging them is not a false positive
            out[kind] = pair_scores(t, names, f[kind], all_dup | blank)
            for c in names:
                out[kind][f"recall_{c}"] = pair_scores(t, [c], f[kind], all_dup | blank)["recall"]
    if "clip_score" in cols:
        shuffled = set(f["shuffled"]) | set(f.get("shuffled_copies", []))
        pct = shuffle_pct or 100.0 * len(shuffled) / t.num_rows
        fl = flags(f"clip_score bottom {pct:.2f}%")
        flagged = {k for k, v in fl.items() if v}
        out["shuffled_caption"] = {
            "injected": len(shuffled),
            "flagged": len(flagged),
            "bottom_pct": round(pct, 2),
            "recall": len(flagged & shuffled) / max(1, len(shuffled)),
            "precision": len(flagged & shuffled) / max(1, len(flagged)),
        }
        sc = dict(zip(keys, t.column("clip_score").to_pylist()))
        a = np.array([sc[k] for k in shuffled if sc.get(k) is not None])
        b = np.array([v for k, v in sc.items() if k not in shuffled and v is not None])
        out["shuffled_caption"]["mean_score_shuffled_vs_rest"] = [float(a.mean()), float(b.mean())]
    return out


def fault_sets(f: dict) -> dict[str, set[str]]:
    """Rows that carry each fault. A duplicate pair counts both members (dropping either one is right)."""
    return {
        "shuffled": set(f["shuffled"]) | set(f.get("shuffled_copies", [])),
        "exact_dup": {k for pair in f["exact_dup"].items() for k in pair},
        "near_dup": {k for pair in f["near_dup"].items() for k in pair},
        "blank": set(f["blank"]),
    }


def recipe_table(scores_dir: str, faults_path: str, recipe: list[str]) -> dict:
    """P/R of each recipe filter (and of the whole recipe) per fault type, on the rows it *removes*.

    recall = faults of that type removed / injected (a duplicate pair counts as caught when at least one
    member is removed); precision_type = removed rows of that type / removed; precision_any = removed
    rows carrying any injected fault / removed.
    """
    t = pq.read_table(f"{scores_dir}/scores.parquet")
    f = json.loads(open(faults_path).read())
    keys = t.column("key").to_pylist()
    fs = fault_sets(f)
    anyf = set().union(*fs.values())
    pairs = {"exact_dup": f["exact_dup"], "near_dup": f["near_dup"]}
    out: dict = {}
    masks = []
    for expr in recipe + ["<recipe>"]:
        if expr == "<recipe>":
            keep = np.logical_and.reduce(masks)
        else:
            keep = np.asarray(evaluate(parse(expr), t).to_numpy(zero_copy_only=False), dtype=object)
            keep = np.array([bool(x) for x in keep])  # null -> dropped, like `curate filter`
            masks.append(keep)
        removed = {k for k, kp in zip(keys, keep.tolist()) if not kp}
        row: dict = {"removed": len(removed), "precision_any": len(removed & anyf) / max(1, len(removed))}
        for kind, ks in fs.items():
            if kind in pairs:
                pr = pairs[kind]
                caught = sum(1 for c, o in pr.items() if c in removed or o in removed)
                rec = caught / max(1, len(pr))
            else:
                rec = len(removed & ks) / max(1, len(ks))
            row[kind] = {"recall": rec, "precision": len(removed & ks) / max(1, len(removed))}
        out[expr] = row
    return out


def robustness(models: list[str], output: str, limit: int, data_root: str | None, as_json: bool) -> int:
    """A robustness curve per model (evaluate/robustness.py does the work)."""
    from clipforge.evaluate.robustness import robustness_rows, run_robustness
    from clipforge.models import load_model

    rows, reports = [], {}
    for i, spec in enumerate(models):
        cfg = {"output": f"{output}/{i}", "limit": limit, "data_root": data_root, "progress": not as_json}
        rep = run_robustness(load_model(spec, allow_code=True), cfg)
        reports[spec] = {"output": cfg["output"], "results": rep["results"], "seconds": rep["seconds"]}
        rows += [[spec, *r] for r in robustness_rows(rep)]
    if as_json:
        emit_json(reports)
    else:
        print(format_table(rows, ["model", "corruption", "clean", "s1", "s2", "s3"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="robustness curve of this model (repeat)")
    ap.add_argument("--output", default="runs/eval-robustness", help="robustness: per-model dirs go here")
    ap.add_argument("--limit", type=int, default=1000, help="robustness: first N CIFAR-10 test images")
    ap.add_argument("--data-root", default=None, help="robustness: dir with cifar10/")
    ap.add_argument("--scores", default=None, help="curate run output dir")
    ap.add_argument("--faults", default=None, help="faults.json from make_corrupted_flickr.py")
    ap.add_argument("--shuffle-pct", type=float, default=None, help="bottom %% of clip_score flagged")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.model:
        return robustness(a.model, a.output, a.limit, a.data_root, a.json)
    if not (a.scores and a.faults):
        ap.error("give --model M (robustness curves) or --scores DIR --faults FILE (curation faults)")
    res = evaluate_faults(a.scores, a.faults, a.shuffle_pct)
    if a.json:
        emit_json(res)
    else:
        rows = [
            (k, v["injected"], v["flagged"], v["precision"], v["recall"])
            for k, v in res.items()
            if isinstance(v, dict)
        ]
        print(format_table(rows, ["fault", "injected", "flagged", "precision", "recall"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
