"""``clipforge curate run|filter|report`` (imports stay light: heavy work is imported in handlers)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger("clipforge.curate")

DEFAULT_STAGES = "clip-score,text,image,dedup"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("curate", help="score, filter, dedup and balance image-text pairs")
    sub = p.add_subparsers(dest="curate_command", metavar="ACTION")
    sub.required = True

    r = sub.add_parser("run", help="score shards into Parquet tables (resumable), then dedup/balance")
    r.add_argument("--data", nargs="+", required=True, help="shard specs (paths, globs, brace ranges, URLs)")
    r.add_argument("--output", required=True, help="output dir for score tables")
    r.add_argument(
        "--stages",
        default=DEFAULT_STAGES,
        help=f"comma list of clip-score,text,image,safety,dedup,balance (default {DEFAULT_STAGES})",
    )
    r.add_argument("--model", default=None, help="model spec or saved dir (clip-score, safety)")
    r.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="local thread pool or Ray Data"
    )
    r.add_argument("--workers", type=int, default=1, help="shards in parallel (local threads / Ray CPUs)")
    r.add_argument("--ray-address", default=None, help="connect to a Ray cluster instead of starting one")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--image-size", type=int, default=None, help="score at this input size (cheaper on CPU)")
    r.add_argument("--draft-size", type=int, default=None, help="JPEG DCT-domain downscale at decode")
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    r.add_argument("--lexicon", default=None, help="visual noun lexicon file (default: shipped)")
    r.add_argument("--safety-prompts", default=None, help="safety prompt JSON (default: shipped)")
    r.add_argument("--eval-data", nargs="+", default=None, help="eval shards to dedup against (dedup stage)")
    r.add_argument("--dup-threshold", type=float, default=0.95, help="SemDeDup cosine threshold")
    r.add_argument("--eval-threshold", type=float, default=0.92, help="eval-set duplicate cosine threshold")
    r.add_argument("--phash-radius", type=int, default=10, help="near-duplicate pHash Hamming radius (of 64)")
    r.add_argument(
        "--keep",
        choices=["clip-score", "centroid"],
        default="clip-score",
        help="which member of a duplicate group to keep",
    )
    r.add_argument("--balance-t", type=int, default=20_000, help="MetaCLIP per-concept cap t")
    r.add_argument("--concepts", default=None, help="concept list file for balance (default: shipped)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("filter", help="apply filter expressions: keep-list + reshard of kept samples")
    f.add_argument("--scores", required=True, help="a `curate run` output dir")
    f.add_argument(
        "--where",
        action="append",
        required=True,
        help='filter expression, repeatable (intersected), e.g. "clip_score top 30%%"',
    )
    f.add_argument("--output", required=True, help="dir for keep.txt, filter.json and curated shards")
    f.add_argument("--no-reshard", action="store_true", help="only write the keep-list")
    f.add_argument("--maxcount", type=int, default=10_000, help="samples per output shard")
    f.add_argument("--prefix", default="curated", help="output shard name prefix")
    f.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    f.set_defaults(func=cmd_filter)

    rp = sub.add_parser("report", help="histograms, filter counts and contact sheets of a scored set")
    rp.add_argument("--scores", required=True, help="a `curate run` output dir")
    rp.add_argument("--output", default=None, help="report dir (default SCORES/report)")
    rp.add_argument("--where", action="append", default=None, help="filter expressions to count")
    rp.add_argument("--examples", type=int, default=8, help="pairs per contact sheet")
    rp.add_argument("--sheet-column", default="clip_score", help="column to sort contact sheets by")
    rp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    rp.set_defaults(func=cmd_report)


def _fail(args: argparse.Namespace, msg: str) -> int:
    if getattr(args, "json", False):
        from clipforge.utils import emit_json

        emit_json({"error": msg})
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    from clipforge.curate.balance import BalanceConfig
    from clipforge.curate.dedup import DedupConfig
    from clipforge.curate.engine import run_curation
    from clipforge.curate.stages import CurateConfig
    from clipforge.utils import emit_json, format_table, setup_torch_threads

    setup_torch_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    cfg = CurateConfig(
        stages=stages,
        model=args.model,
        batch_size=args.batch_size,
        image_size=args.image_size,
        draft_size=args.draft_size,
        lexicon=args.lexicon,
        safety_prompts=args.safety_prompts,
    )
    dedup = DedupConfig(
        threshold=args.dup_threshold,
        eval_threshold=args.eval_threshold,
        phash_radius=args.phash_radius,
        keep=args.keep,
        seed=args.seed,
    )
    balance = BalanceConfig(t=args.balance_t, concepts=args.concepts, seed=args.seed)
    try:
        summary = run_curation(
            args.data,
            args.output,
            cfg,
            engine=args.engine,
            workers=args.workers,
            eval_data=args.eval_data,
            dedup=dedup,
            balance=balance,
            ray_address=args.ray_address,
            progress=True,
        )
    except (ValueError, FileNotFoundError) as e:
        return _fail(args, str(e))
    if args.json:
        emit_json(summary)
        return 0
    rows = [
        ("rows", summary["rows"]),
        ("shards scored", summary["shards_scored"]),
        ("shards resumed", summary["shards_resumed"]),
        ("sample stages s", summary["sample_stage_seconds"]),
        ("global stages s", summary["global_stage_seconds"]),
    ]
    for name, st in summary["global"].items():
        rows += [(f"{name}: {k}", v) for k, v in st.items() if isinstance(v, (int, float))]
    rows += [(f"bad: {k}", v) for k, v in summary["bad_samples"].items()]
    print(format_table(rows, ["", "value"]))
    print(f"scores: {summary['output']}/scores.parquet")
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from clipforge.curate.filter import FilterError
    from clipforge.curate.reshard import filter_run
    from clipforge.utils import emit_json, format_table

    try:
        s = filter_run(
            args.scores,
            args.where,
            args.output,
            reshard=not args.no_reshard,
            maxcount=args.maxcount,
            prefix=args.prefix,
        )
    except (FilterError, FileNotFoundError) as e:
        return _fail(args, str(e))
    if args.json:
        emit_json(s)
        return 0
    rows = [(c["filter"], c["kept"], c["kept_frac"]) for c in s["filters"]]
    rows.append(("ALL (intersection)", s["kept"], s["kept_frac"]))
    print(format_table(rows, ["filter", "kept", "fraction"]))
    print(f"keep-list: {args.output}/keep.txt; shards: {len(s['shards'])}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clipforge.curate.filter import FilterError
    from clipforge.curate.report import build_report
    from clipforge.utils import emit_json, format_table

    out = args.output or str(Path(args.scores) / "report")
    try:
        s = build_report(args.scores, out, args.where, args.examples, args.sheet_column)
    except (FilterError, FileNotFoundError) as e:
        return _fail(args, str(e))
    if args.json:
        emit_json(s)
        return 0
    print(
        format_table(
            [(c, v["mean"], v["p5"], v["p50"], v["p95"], v["null"]) for c, v in s["stats"].items()],
            ["column", "mean", "p5", "p50", "p95", "null"],
        )
    )
    if "filters" in s:
        rows = [(c["filter"], c["kept"], c["kept_frac"]) for c in s["filters"]]
        rows.append(("ALL (intersection)", s["intersection"]["kept"], s["intersection"]["kept_frac"]))
        print(format_table(rows, ["filter", "kept", "fraction"]))
    print(f"report: {out} ({len(s['histograms'])} histograms)")
    return 0
