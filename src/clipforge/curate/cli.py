"""``clipforge curate run|filter|report`` (imports stay light: heavy work is imported in handlers)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from clipforge.config import add_arguments
from clipforge.curate.config import DEFAULT_STAGES, KEEP, CurateConfig

log = logging.getLogger("clipforge.curate")

# Flag names from before the config was generated from fields: aliases of the nested fields.
LEGACY_FLAGS = [
    ("--dup-threshold", "dedup.threshold", {"type": float}),
    ("--eval-threshold", "dedup.eval_threshold", {"type": float}),
    ("--phash-radius", "dedup.phash_radius", {"type": int}),
    ("--keep", "dedup.keep", {"choices": list(KEEP)}),
    ("--balance-t", "balance.t", {"type": int}),
    ("--concepts", "balance.concepts", {}),
    ("--folds", "folds.k", {"type": int}),  # issue 13's spelling: --folds K --recipe quickstart
    ("--recipe", "folds.recipe", {"choices": ["quickstart", "frozen-linear"]}),
]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("curate", help="score, filter, dedup and balance image-text pairs")
    sub = p.add_subparsers(dest="curate_command", metavar="ACTION")
    sub.required = True

    r = sub.add_parser(
        "run",
        help="score shards into Parquet tables (resumable), then dedup/balance",
        description="Flags are generated from CurateConfig (curate/config.py); --config FILE.yaml gives "
        "the same keys as a file, flags override it. Rerunning into the same --output resumes (same "
        "settings required; stages may be added); --overwrite starts over.",
    )
    r.add_argument("--data", nargs="+", required=True, help="shard specs (paths, globs, brace ranges, URLs)")
    r.add_argument("--output", required=True, help="output dir for score tables")
    r.add_argument("--config", default=None, help="YAML file with CurateConfig keys (flags override it)")
    r.add_argument(
        "--stages",
        nargs="+",
        default=argparse.SUPPRESS,
        help=f"comma list of clip-score,text,image,copy,safety,dedup,balance (default {','.join(DEFAULT_STAGES)})",
    )
    add_arguments(r, CurateConfig, skip={"stages"})
    for old, dest, kw in LEGACY_FLAGS:  # today's short names keep working
        r.add_argument(
            old, dest=dest, default=argparse.SUPPRESS, help=f"same as --{dest.replace('_', '-')}", **kw
        )
    r.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="sets --dedup.seed and --balance.seed")
    r.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="local thread pool or Ray Data"
    )
    r.add_argument("--workers", type=int, default=1, help="shards in parallel (local threads / Ray CPUs)")
    r.add_argument("--ray-address", default=None, help="connect to a Ray cluster instead of starting one")
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    r.add_argument("--eval-data", nargs="+", default=None, help="eval shards to dedup against (dedup stage)")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier result in --output")
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
    f.add_argument("--overwrite", action="store_true", help="replace an earlier result in --output")
    f.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    f.set_defaults(func=cmd_filter)

    th = sub.add_parser(
        "threshold",
        help="a clip-score cut without labels: 2-Gaussian mixture per caption-length bucket",
        description="Fits two Gaussians to the score column (per bucket of caption word counts) and "
        "reports the cut (noise posterior = 1/2) and the estimated noise rate (the low component's "
        "weight). The same cut filters with `curate filter --where 'clip_score > auto'`.",
    )
    th.add_argument("--scores", required=True, help="a `curate run` output dir")
    th.add_argument("--column", default="clip_score", help="numeric score column")
    th.add_argument("--buckets", type=int, default=4, help="caption-length buckets (1 = one pooled fit)")
    th.add_argument("--min-bucket", type=int, default=200, help="smaller buckets use the pooled fit")
    th.add_argument("--seed", type=int, default=0, help="mixture initialization seed")
    th.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    th.set_defaults(func=cmd_threshold)

    fx = sub.add_parser(
        "fix",
        help="recaption pairs below the clip-score cut instead of dropping them (action per key)",
        description="Rows failing a --where keep-rule are dropped; rows matching --fix (default "
        "'clip_score < auto', the label-free mixture cut) get the best synthetic caption of the "
        "`caption run` side tables given (dropped when there is none, or when its scoring model prefers "
        "the original); the rest are kept. Writes OUTPUT/actions.parquet (key, action, reason, captions) "
        "and OUTPUT/shards/PREFIX-STEM.tar (KEY.txt = chosen caption, originals in KEY.json). Rerunning "
        "with the same settings resumes.",
    )
    fx.add_argument("--scores", required=True, help="a `curate run` output dir (clip_score column)")
    fx.add_argument(
        "--captions", nargs="+", required=True, help="`caption run` output dirs or side-table Parquet files"
    )
    fx.add_argument("--output", required=True, help="dir for actions.parquet, fix.json and fixed shards")
    fx.add_argument(
        "--where",
        action="append",
        default=None,
        help="keep-rule, repeatable (default: the recipe's image/duplicate rules whose columns exist)",
    )
    fx.add_argument("--fix", default="clip_score < auto", help="rows to recaption (a filter expression)")
    fx.add_argument(
        "--any-caption",
        action="store_true",
        help="recaption even when the side table's scoring model prefers the original caption",
    )
    fx.add_argument(
        "--policy",
        choices=["replace", "compete"],
        default="replace",
        help="replace: the synthetic caption its CLIPScore prefers to the original; compete: raw and "
        "synthetic candidates by plain cosine against the row's cut, dropped when none clears it",
    )
    fx.add_argument("--prefix", default="fixed", help="output shard name prefix")
    fx.add_argument(
        "--recaption-weight",
        type=float,
        default=1.0,
        help="loss weight of a recaptioned pair in OUTPUT/weights.parquet (kept pairs: 1); train with "
        "--text-tables OUTPUT/weights.parquet --weight-column pair_weight",
    )
    fx.add_argument("--overwrite", action="store_true", help="replace an earlier result in --output")
    fx.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    fx.set_defaults(func=cmd_fix)

    rp = sub.add_parser("report", help="histograms, filter counts and contact sheets of a scored set")
    rp.add_argument("--scores", required=True, help="a `curate run` output dir")
    rp.add_argument("--output", default=None, help="report dir (default SCORES/report)")
    rp.add_argument("--where", action="append", default=None, help="filter expressions to count")
    rp.add_argument("--examples", type=int, default=8, help="pairs per contact sheet")
    rp.add_argument("--sheet-column", default="clip_score", help="column to sort contact sheets by")
    rp.add_argument("--overwrite", action="store_true", help="replace an earlier report in --output")
    rp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    rp.set_defaults(func=cmd_report)


def _fail(args: argparse.Namespace, msg: str) -> int:
    """One clear line on stderr (and ``{"error": ...}`` with --json), exit code 2: no traceback."""
    msg = " ".join(str(msg).split())
    if getattr(args, "json", False):
        from clipforge.utils import emit_json

        emit_json({"error": msg})
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _skip_rows(summary: dict[str, Any], *names: str) -> list[tuple[str, Any]]:
    """Rows ``(counter, n)`` for the non-zero skip/bad counters ``names`` of a summary (a dict counter
    gives a row per reason, a list one row naming them). Why: in text mode a skip that only shows up
    as a log warning is missed; ``--json`` prints them all anyway."""
    rows: list[tuple[str, Any]] = []
    for name in names:
        v = summary.get(name)
        if isinstance(v, dict):
            rows += [(f"{name}: {k}", n) for k, n in v.items() if n]
        elif isinstance(v, (list, tuple)):
            if v:
                rows.append((name, "; ".join(map(str, v))))
        elif v:
            rows.append((name, v))
    return rows


def _print_skips(summary: dict[str, Any], *names: str) -> None:
    """The non-zero counters of :func:`_skip_rows` as a table (nothing when all are zero)."""
    from clipforge.utils import format_table

    rows = _skip_rows(summary, *names)
    if rows:
        print(format_table(rows, ["skipped / bad", "rows"]))


def _filter_rows(filters: list[dict[str, Any]], total: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Per-expression counts + the intersection; ``dropped_null``: dropped for a null/NaN value only."""
    rows: list[tuple[Any, ...]] = [
        (c["filter"], c["kept"], c["kept_frac"], c.get("dropped_null", 0)) for c in filters
    ]
    rows.append(("ALL (intersection)", total["kept"], total["kept_frac"], ""))
    return rows


FILTER_HEADERS = ["filter", "kept", "fraction", "dropped: null/NaN"]


def config_from_args(args: argparse.Namespace) -> CurateConfig:
    """--config FILE (if any), overridden by the flags given; --stages takes commas or spaces."""
    from clipforge.config import from_args, load_file

    given = vars(args)
    if "stages" in given:
        given["stages"] = [s.strip() for item in given["stages"] for s in item.split(",") if s.strip()]
    if "seed" in given:
        for dest in ("dedup.seed", "balance.seed"):
            given.setdefault(dest, given["seed"])
    base = load_file(args.config) if args.config else None
    return from_args(CurateConfig, args, base=base)


def run_with_folds(args: argparse.Namespace, cfg: CurateConfig) -> dict[str, Any]:
    """``--folds K``: the clip-score column comes from K fold scorers (curate/folds.py), each scoring
    the fold it never trained on; the other stages run as usual (with ``--model``, its in-sample score
    is kept as ``clip_score_model``), except that dedup keeps the member of a duplicate group with the
    best out-of-fold score (read from ``OUT/folds/oof.parquet``). The run's config.yaml/manifest record K and the recipe."""
    import dataclasses
    from pathlib import Path

    from clipforge.config import write_run_config
    from clipforge.curate.engine import open_run_dir, run_curation
    from clipforge.curate.folds import merge_oof, run_folds
    from clipforge.data.shards import expand_shards
    from clipforge.utils import write_json

    out = Path(args.output)
    stages = [s for s in cfg.stages if s != "clip-score" or cfg.model]
    engine_cfg = dataclasses.replace(cfg, stages=stages)
    open_run_dir(out, engine_cfg, args.overwrite, inputs=expand_shards(args.data))  # the dir rule first
    folds = run_folds(args.data, out / "folds", cfg.folds, threads=args.threads)
    if stages:
        import pyarrow.parquet as pq

        oof = pq.read_table(out / "folds" / "oof.parquet", columns=["key", "clip_score"])
        keep = dict(zip(oof.column("key").to_pylist(), oof.column("clip_score").to_pylist()))
        summary = run_curation(
            args.data, out, engine_cfg, engine=args.engine, workers=args.workers, eval_data=args.eval_data,
            ray_address=args.ray_address, progress=True, keep_scores=keep,
        )  # fmt: skip
    else:  # clip-score only: the table is the out-of-fold scores with the usual key/shard/caption columns
        summary = run_curation(args.data, out, dataclasses.replace(cfg, stages=["text"]), progress=True)
    merged = merge_oof(out, out / "folds" / "oof.parquet")
    write_run_config(out / "config.yaml", cfg)  # the stages asked for (clip-score included)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.update(config=cfg.to_dict(), folds={**folds, **merged})
    write_json(manifest_path, manifest)
    summary["folds"] = {**folds, **merged}
    return summary


def cmd_run(args: argparse.Namespace) -> int:
    from clipforge.curate.engine import run_curation
    from clipforge.utils import OutputExistsError, emit_json, format_table, setup_torch_threads

    setup_torch_threads(args.threads)
    try:
        cfg = config_from_args(args)
        if cfg.folds.k:
            summary = run_with_folds(args, cfg)
        else:
            summary = run_curation(
                args.data,
                args.output,
                cfg,
                engine=args.engine,
                workers=args.workers,
                eval_data=args.eval_data,
                ray_address=args.ray_address,
                progress=True,
                overwrite=args.overwrite,
            )
    except (ValueError, FileNotFoundError, OutputExistsError) as e:  # ConfigError, ShardSpecError: ValueError
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
    rows += [(f"bad: {k}", v) for k, v in summary["bad_samples"].items() if v]
    rows += [(f"folds: {k}", v) for k, v in summary.get("folds", {}).items() if k == "missing" and v]
    print(format_table(rows, ["", "value"]))
    print(f"scores: {summary['output']}/scores.parquet")
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from clipforge.curate.reshard import filter_run
    from clipforge.utils import OutputExistsError, emit_json, format_table

    try:
        s = filter_run(
            args.scores,
            args.where,
            args.output,
            reshard=not args.no_reshard,
            maxcount=args.maxcount,
            prefix=args.prefix,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError, OutputExistsError) as e:  # FilterError, ShardSpecError: ValueError
        return _fail(args, str(e))
    if args.json:
        emit_json(s)
        return 0
    print(format_table(_filter_rows(s["filters"], s), FILTER_HEADERS))
    _print_skips(s, "skipped_null_key", "not_written", "bad_samples")
    print(f"keep-list: {args.output}/keep.txt; shards: {len(s['shards'])}")
    return 0


def cmd_threshold(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pyarrow.parquet as pq

    from clipforge.curate.threshold import table_auto_threshold
    from clipforge.utils import emit_json, format_table

    path = Path(args.scores) / "scores.parquet"
    try:
        if not path.is_file():
            raise FileNotFoundError(f"no scores table at {path}: run `clipforge curate run` first")
        table = pq.read_table(path)
        if args.column not in table.column_names:
            raise ValueError(f"no column {args.column!r} in {path}")
        if args.buckets < 1 or args.min_bucket < 10:
            raise ValueError("--buckets must be >= 1 and --min-bucket >= 10")
        res = table_auto_threshold(
            table, args.column, n_buckets=args.buckets, min_bucket=args.min_bucket, seed=args.seed
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        return _fail(args, str(e))
    res.pop("cuts")
    res["column"] = args.column
    res["skipped_non_finite"] = table.num_rows - res["n"]  # null/NaN/inf scores: not in any fit
    if args.json:
        emit_json(res)
        return 0
    rows = [
        (
            b["words"],
            b.get("rows", b["n"]),
            b["fit"],
            round(b["cut"], 4),
            round(b["noise_rate"], 4),
            b["bimodal"],
        )
        for b in res["buckets"]
    ]
    print(format_table(rows, ["caption words", "rows", "fit", "cut", "noise rate", "bimodal"]))
    print(
        f"estimated noise rate {res['noise_rate']:.4f}; below the cuts {res['below_cut']:.4f} of {res['n']}"
    )
    _print_skips(res, "skipped_non_finite")
    return 0


# fix.json's counters of what was skipped, unjudged or lost (curate/fix.py ``fix_run``).
FIX_SKIPS = (
    "kept_unjudged",
    "caption_rows_skipped",
    "synthetic_captions_unmatched",
    "where_skipped_no_column",
    "bad_samples",
)


def cmd_fix(args: argparse.Namespace) -> int:
    from clipforge.curate.fix import fix_run
    from clipforge.utils import OutputExistsError, emit_json, format_table

    try:
        s = fix_run(
            args.scores,
            args.captions,
            args.output,
            where=args.where,
            fix=args.fix,
            require_better=not args.any_caption,
            policy=args.policy,
            prefix=args.prefix,
            recaption_weight=args.recaption_weight,
            overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, OutputExistsError, OSError) as e:  # FilterError: ValueError
        return _fail(args, str(e))
    if args.json:
        emit_json(s)
        return 0
    rows = [(a, n) for a, n in s["actions"].items()] + [
        (f"dropped: {r}", n) for r, n in s["dropped_by"].items()
    ]
    print(format_table(rows, ["action", "rows"]))
    _print_skips(s, *FIX_SKIPS)
    print(f"actions: {args.output}/actions.parquet; shards: {len(s['shards'])}")
    print(f"pair weights (recaptioned {s['recaption_weight']:g}): train with {s['train_weights']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clipforge.curate.report import build_report
    from clipforge.utils import OutputExistsError, emit_json, format_table

    out = args.output or str(Path(args.scores) / "report")
    try:
        s = build_report(args.scores, out, args.where, args.examples, args.sheet_column, args.overwrite)
    except (ValueError, OSError, OutputExistsError) as e:  # FilterError, ShardSpecError: ValueError
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
        print(format_table(_filter_rows(s["filters"], s["intersection"]), FILTER_HEADERS))
    _print_skips(s, "bad_samples")
    print(f"report: {out} ({len(s['histograms'])} histograms)")
    return 0
