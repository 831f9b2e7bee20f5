"""``clipforge serve MODEL [--index DIR]``: argument parsing; the app lives in app.py / service.py."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

log = logging.getLogger("clipforge.serve")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve search, zero-shot classification and embeddings over HTTP (+ a web page)"
    )
    p.add_argument("model", nargs="?", default=None, help="model spec or dir (default: the index's model)")
    p.add_argument("--index", default=None, help="index directory from `clipforge index build`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("CLIPFORGE_API_KEY"),
        help="require X-API-Key (env CLIPFORGE_API_KEY)",
    )
    p.add_argument(
        "--cors-origin", action="append", default=[], help="allowed CORS origin (repeatable, or *)"
    )
    p.add_argument("--no-batching", action="store_true", help="one model call per request")
    p.add_argument("--max-batch", type=int, default=32, help="largest micro-batch")
    p.add_argument(
        "--max-image-batch", type=int, default=None, help="largest image micro-batch (default: 1 on CPU)"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="longest a request waits for a batch to fill"
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="request body limit")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="decode limit (width*height)")
    p.add_argument("--max-k", type=int, default=100, help="largest k for /search")
    p.add_argument("--allow-image-urls", action="store_true", help="let clients send image URLs to fetch")
    p.add_argument("--label-set", action="append", default=[], metavar="NAME=FILE", help="extra label set")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "auto"],
        help="model precision: bf16 autocast is ~3x faster for text on CPUs with AVX512-BF16/AMX "
        "(auto: bf16 only where native)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def make_service(args: argparse.Namespace) -> Any:
    """Parsed ``serve`` arguments -> a ready ClipService (raises ValueError/FileNotFoundError on bad input)."""
    from clipforge.index.encode import load_model_spec
    from clipforge.index.store import ClipIndex
    from clipforge.serve.service import ClipService, ServeConfig

    extra = {}
    for item in args.label_set:
        name, _, path = item.partition("=")
        if not name or not path or not os.path.isfile(path):
            raise ValueError(f"--label-set needs NAME=FILE with an existing file, got {item!r}")
        extra[name] = path
    index = ClipIndex.load(args.index) if args.index else None
    spec = args.model or (index.model_ref if index is not None else None)
    if spec is None:
        raise ValueError("give a MODEL or an --index (whose model is then used)")
    if index is not None and args.model and args.model != index.model_ref:
        log.warning("serving model %s with an index built by %s", args.model, index.model_ref)
    cfg = ServeConfig(
        batching=not args.no_batching,
        max_batch=args.max_batch,
        max_image_batch=args.max_image_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        max_image_pixels=args.max_image_pixels,
        max_k=args.max_k,
        api_key=args.api_key or None,
        cors_origins=args.cors_origin,
        allow_image_urls=args.allow_image_urls,
        label_sets=extra,
        precision=args.precision,
    )
    return ClipService(load_model_spec(spec), index, cfg)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from clipforge.serve.app import create_app
    from clipforge.serve.server import uvicorn_config
    from clipforge.utils import setup_torch_threads

    setup_torch_threads(args.threads)
    try:
        service = make_service(args)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    app = create_app(service)
    where = f" + {args.index}" if args.index else ""
    log.info(
        "serving %s%s on http://%s:%d (docs at /docs)", service.model.config.spec, where, args.host, args.port
    )
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level)).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
    return 0
