"""``clipforge data ingest|inspect``: argument parsing only; the work lives in ingest.py / inspect.py."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("clipforge.data")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="ingest image-text pairs into shards; inspect shards")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    sub.required = True

    ing = sub.add_parser(
        "ingest",
        help="folder / CSV-TSV-Parquet-JSONL table (paths or URLs) / shards -> webdataset shards",
        description="Ingest image-text pairs into webdataset shards with a Parquet side table per shard. "
        "Bad samples are skipped and listed in OUTPUT/bad_samples.json; transient URL failures go to "
        "OUTPUT/retry.jsonl, which --retry-from fetches alone (appending shards to OUTPUT).",
    )
    ing.add_argument("inputs", nargs="*", metavar="INPUT", help="a folder, a table file, or shard specs")
    ing.add_argument("--output", "-o", required=True, help="output directory for shards and reports")
    ing.add_argument(
        "--overwrite", action="store_true", help="replace a previous result in --output (refused otherwise)"
    )
    ing.add_argument(
        "--root",
        metavar="DIR",
        help="local files (folder images, table path cells, caption files) must resolve inside DIR "
        "(default: the input folder, or the table's folder); others are skipped as outside_root",
    )
    ing.add_argument(
        "--no-confine",
        action="store_true",
        help="read local paths anywhere (only for a table you trust: it can name any readable file)",
    )
    ing.add_argument(
        "--max-image-mb", type=float, default=64.0, help="skip image files/members over this size"
    )
    ing.add_argument(
        "--max-text-mb", type=float, default=1.0, help="skip caption/json files and members over this size"
    )
    ing.add_argument(
        "--max-cell-chars", type=int, default=1 << 20, help="a table cell over this costs its row (reported)"
    )
    ing.add_argument(
        "--from",
        dest="kind",
        default="auto",
        choices=["auto", "folder", "table", "shards"],
        help="input kind (default: guess from INPUT)",
    )
    ing.add_argument("--retry-from", metavar="FILE", help="retry list (retry.jsonl) of an earlier run")
    ing.add_argument("--image-column", default="url", help="table column with image path or URL")
    ing.add_argument("--caption-column", default="caption", help="table column with the caption")
    ing.add_argument("--prefix", default="shard", help="shard file name prefix (PREFIX-000000.tar)")
    ing.add_argument("--maxcount", type=int, default=10_000, help="max samples per shard")
    ing.add_argument("--maxsize-mb", type=float, default=1000.0, help="max shard size in MB")
    ing.add_argument("--max-side", type=int, default=None, help="resize so the longer side <= this (JPEG)")
    ing.add_argument(
        "--shortest-side",
        type=int,
        default=None,
        metavar="S",
        help="resize so the shortest side is S, no crop (img2dataset resize_mode=keep_ratio: area filter "
        "when shrinking, Lanczos when enlarging; re-encodes as JPEG); not with --max-side",
    )
    ing.add_argument(
        "--resize-only-if-bigger",
        action="store_true",
        help="with --shortest-side: never upsample an image whose shortest side is below S "
        "(img2dataset resize_only_if_bigger)",
    )
    ing.add_argument(
        "--no-draft",
        action="store_true",
        help="decode JPEGs at full size before shrinking (default: libjpeg's 1/2-1/8 draft decode first, "
        "much less CPU; without it pixels are closer to img2dataset's cv2 area filter)",
    )
    ing.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    ing.add_argument("--workers", type=int, default=16, help="download/decode threads")
    ing.add_argument("--timeout", type=float, default=10.0, help="HTTP connect/read timeout (s)")
    ing.add_argument(
        "--total-timeout",
        type=float,
        default=60.0,
        help="wall-clock limit for one URL's whole download, redirects included (s)",
    )
    ing.add_argument("--retries", type=int, default=2, help="retries for transient HTTP failures")
    ing.add_argument("--backoff", type=float, default=0.5, help="first retry delay (s), doubled each retry")
    ing.add_argument("--per-host", type=int, default=4, help="max concurrent requests per host")
    ing.add_argument("--host-delay", type=float, default=0.0, help="min seconds between requests to a host")
    ing.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let URL cells reach loopback/private/link-local addresses (refused by default: a shared "
        "table must not make ingest read internal services)",
    )
    ing.add_argument("--json", action="store_true", help="print one JSON object (stats) on stdout")
    ing.set_defaults(func=cmd_ingest)

    ins = sub.add_parser(
        "inspect",
        help="counts, caption/image-size histograms, contact sheet, bad-sample report",
        description="Decode every sample of SHARDS and summarize: per-shard counts, caption length and image "
        "size histograms (tables + PNGs), a contact sheet of N random samples, and the bad-sample report.",
    )
    ins.add_argument("shards", nargs="+", metavar="SHARDS", help="shard paths, globs, brace ranges or URLs")
    ins.add_argument("--output", "-o", default=None, help="where PNGs/JSON go (default: runs/inspect)")
    ins.add_argument("--samples", type=int, default=16, help="samples on the contact sheet")
    ins.add_argument("--seed", type=int, default=0, help="seed for picking contact-sheet samples")
    ins.add_argument("--workers", type=int, default=2, help="decode threads")
    ins.add_argument("--json", action="store_true", help="print one JSON object (summary) on stdout")
    ins.set_defaults(func=cmd_inspect)


def cmd_ingest(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from clipforge.data.fetch import FetchConfig
    from clipforge.data.ingest import IngestConfig, ingest
    from clipforge.data.reader import ReadLimits
    from clipforge.utils import emit_json, format_table

    mb = 1 << 20
    limits = replace(
        ReadLimits.from_env(),
        max_image_bytes=int(args.max_image_mb * mb),
        max_text_bytes=int(args.max_text_mb * mb),
    )

    cfg = IngestConfig(
        output=args.output,
        prefix=args.prefix,
        maxcount=args.maxcount,
        maxsize=args.maxsize_mb * 1e6,
        max_side=args.max_side,
        shortest_side=args.shortest_side,
        only_if_bigger=args.resize_only_if_bigger,
        draft=not args.no_draft,
        quality=args.quality,
        workers=args.workers,
        image_column=args.image_column,
        caption_column=args.caption_column,
        fetch=FetchConfig(
            timeout=args.timeout,
            total_timeout=args.total_timeout,
            retries=args.retries,
            backoff=args.backoff,
            per_host=args.per_host,
            host_delay=args.host_delay,
            allow_private=args.allow_private_urls,
        ),
        root=args.root,
        confine=not args.no_confine,
        overwrite=args.overwrite,
        limits=limits,
        max_cell_chars=args.max_cell_chars,
    )
    try:
        stats = ingest(args.inputs, cfg, kind=args.kind, retry_from=args.retry_from)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"clipforge data ingest: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        emit_json(stats)
    else:
        rows = [
            ["written", stats["written"]],
            ["skipped", stats["skipped"]],
            ["to retry", stats["retry_count"]],
            ["shards", len(stats["shards"])],
        ]
        rows += [[f"  skipped: {r}", n] for r, n in stats["skipped_by_reason"].items()]
        print(format_table(rows, ["ingest", "count"]), file=sys.stderr if args.json else sys.stdout)
        print(f"bad samples: {stats['bad_samples']}; retry list: {stats['retry_list']}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from clipforge.data.inspect import format_summary, inspect_shards
    from clipforge.utils import default_output, emit_json

    args.output = args.output or str(default_output("inspect"))
    try:
        summary = inspect_shards(
            args.shards, args.output, samples=args.samples, seed=args.seed, workers=args.workers
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"clipforge data inspect: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        emit_json(summary)
    else:
        print(format_summary(summary))
        print(f"\nsamples: {summary['samples']} in {summary['shards']} shards; files in {args.output}/")
    return 0
