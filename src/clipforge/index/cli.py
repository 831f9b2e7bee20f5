"""``clipforge index build|search``: argument parsing only; the work lives in build.py / store.py."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from clipforge.config import add_arguments

log = logging.getLogger("clipforge.index")
HAND_WRITTEN = {"refine"}  # --refine auto|on|off below; every other BuildOptions field is generated
REFINE = {"auto": None, "on": True, "off": False}


def register(subparsers: Any) -> None:
    from clipforge.index.config import BuildOptions

    p = subparsers.add_parser("index", help="embed image shards and build/search a faiss index")
    sub = p.add_subparsers(dest="index_command", metavar="ACTION")
    sub.required = True

    b = sub.add_parser("build", help="embed shards with a model and build an index directory (resumable)")
    b.add_argument(
        "--data", nargs="+", required=True, metavar="SHARDS", help="shard paths/globs/brace ranges"
    )
    b.add_argument("--model", required=True, help="model spec or saved model directory")
    b.add_argument("--output", required=True, help="index directory (rerun to resume)")
    g = b.add_argument_group("index options (BuildOptions)")
    add_arguments(g, BuildOptions, skip=HAND_WRITTEN)
    g.add_argument(
        "--refine", choices=list(REFINE), default=argparse.SUPPRESS,
        help="SQ8 re-ranking for --index-type ivfpq (default: auto)",
    )  # fmt: skip
    b.add_argument("--overwrite", action="store_true", help="replace an output dir holding another build")
    b.add_argument("--resume", action="store_true", help="continue in a non-empty dir without config.yaml")
    b.add_argument(
        "--threads", type=int, default=None, help="torch (or onnxruntime) threads (default: all cores)"
    )
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("search", help="query an index by text, or by image (path or URL)")
    s.add_argument("index", help="index directory")
    s.add_argument("query", help="text, or an image path / http(s) URL")
    s.add_argument("-k", type=int, default=10, help="number of results")
    s.add_argument("--image", action="store_true", help="treat QUERY as an image path/URL")
    s.add_argument("--text", action="store_true", help="treat QUERY as text even if it names a file")
    s.add_argument("--filter", action="append", default=[], metavar="COL=VALUE", help="column filter")
    s.add_argument("--model", default=None, help="override the model recorded in the index")
    s.add_argument(
        "--runtime", choices=["torch", "onnx"], default="torch", help="torch | onnx (the model's onnx export)"
    )
    s.add_argument("--threads", type=int, default=None, help="torch (or onnxruntime) threads")
    s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    s.set_defaults(func=cmd_search)


def _parse_filters(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--filter needs COL=VALUE, got {it!r}")
        col, val = it.split("=", 1)
        try:
            v: Any = json.loads(val)
        except json.JSONDecodeError:
            v = val
        out.setdefault(col, []).append(v)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def cmd_build(args: argparse.Namespace) -> int:
    from clipforge.config import ConfigError, from_args
    from clipforge.index.build import build_index
    from clipforge.index.config import BuildOptions
    from clipforge.utils import OutputExistsError, emit_json, format_table, setup_torch_threads

    setup_torch_threads(args.threads)
    try:
        base = {"refine": REFINE[args.refine]} if "refine" in args else {}
        opt = from_args(BuildOptions, args, base=base)
        mf = build_index(  # --model is the user's own argument: a py:MODULE:FUNCTION spec is honoured
            args.data, args.model, args.output, opt, overwrite=args.overwrite, resume=args.resume,
            allow_code=True, threads=args.threads,
        )  # fmt: skip
    except (ConfigError, OutputExistsError) as e:
        log.error("%s", e)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        log.error("%s", e)
        return 2
    ix = mf["index"]
    summary = {
        "output": args.output,
        "count": mf["count"],
        "dim": mf["dim"],
        "index": ix["factory"],
        "recall@10": ix.get("recall@10"),
        "params": ix.get("params"),
        "bad_samples": mf["bad_samples"]["total"],
        "embed_seconds": mf["build"]["embed_seconds"],
        "index_seconds": mf["build"]["index_seconds"],
        "dims": mf["dims"],
    }
    if args.json:
        emit_json(summary)
    else:
        rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in summary.items()]
        print(format_table(rows, ["field", "value"]))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from clipforge.data.decode import SkipSample
    from clipforge.export.runtime import model_identity
    from clipforge.index.build import load_for_runtime
    from clipforge.index.query import load_image_query, looks_like_image_ref
    from clipforge.index.store import ClipIndex, FilterError
    from clipforge.models.encode import embed_pil_images, embed_texts
    from clipforge.utils import emit_json, format_table, setup_torch_threads

    if not 1 <= args.k <= 10_000:
        log.error("-k must be in 1..10000")
        return 2
    setup_torch_threads(args.threads)
    try:
        index = ClipIndex.load(args.index)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    try:  # a model named on the command line may be code (py:...); one read from the manifest never
        spec = args.model or index.model_ref
        model = load_for_runtime(spec, args.runtime, args.threads, allow_code=bool(args.model))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        log.error("%s", e)
        return 2
    if model_identity(model) != index.manifest.get("model_fingerprint"):
        log.warning("model weights differ from the ones that built this index: scores will be meaningless")
    as_image = args.image or (not args.text and looks_like_image_ref(args.query))
    try:
        if as_image:
            q = embed_pil_images(model, [load_image_query(args.query)])
        else:
            if not args.query.strip():
                log.error("empty query text")
                return 2
            q = embed_texts(model, [args.query])
        hits = index.search(q, args.k, _parse_filters(args.filter) or None)[0]
    except (SkipSample, FileNotFoundError, FilterError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    results = index.results(hits)
    if args.json:
        emit_json(
            {"query": args.query, "kind": "image" if as_image else "text", "k": args.k, "results": results}
        )
        return 0
    rows = [
        [r["rank"], r["key"], round(r["score"], 4), _clip(r.get("caption") or r.get("classname") or "", 70)]
        for r in results
    ]
    print(format_table(rows, ["rank", "key", "score", "caption"]))
    if not results:
        print("(no results)", file=sys.stderr)
    return 0


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"
