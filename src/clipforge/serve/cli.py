"""``clipforge serve MODEL [--index DIR]``: argument parsing; the app lives in app.py / service.py.

The ServeConfig flags are generated from its fields (:func:`clipforge.config.add_arguments`), so no
field lacks a flag and every default lives once, in serve/config.py. Two fields keep their historical
flag form: ``--cors-origin`` is repeatable and ``--max-upload-mb`` gives the body limit in MiB.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from clipforge.config import add_arguments, from_args

log = logging.getLogger("clipforge.serve")

RENAME = {"label_sets": "label-set"}
HAND_WRITTEN = {"cors_origins"}  # repeatable flag below; every other field is generated
MIB = 1 << 20


def register(subparsers: Any) -> None:
    from clipforge.serve.config import ServeConfig

    p = subparsers.add_parser(
        "serve",
        help="serve search, zero-shot classification, embeddings and captions over HTTP (+ a web page)",
    )
    p.add_argument("model", nargs="?", default=None, help="model spec or dir (default: the index's model)")
    p.add_argument("--index", default=None, help="index directory from `clipforge index build`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--threads", type=int, default=None, help="torch (or onnxruntime) threads (default: all cores)"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g = p.add_argument_group("server limits and switches (ServeConfig)")
    add_arguments(g, ServeConfig, skip=HAND_WRITTEN, rename=RENAME)
    g.add_argument(
        "--cors-origin", dest="cors_origins", action="append", default=argparse.SUPPRESS,
        help="allowed CORS origin (repeatable, or *)",
    )  # fmt: skip
    g.add_argument(
        "--max-upload-mb", type=float, default=argparse.SUPPRESS,
        help="request body limit in MiB (default: 10; same as --max-upload-bytes)",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)


def serve_config(args: argparse.Namespace) -> Any:
    """The ServeConfig from parsed flags (only the flags given override the dataclass defaults)."""
    from clipforge.config import ConfigError
    from clipforge.serve.config import ServeConfig

    base: dict[str, Any] = {}
    if "max_upload_mb" in args:
        if "max_upload_bytes" in args:
            raise ConfigError("give --max-upload-mb or --max-upload-bytes, not both")
        base["max_upload_bytes"] = int(args.max_upload_mb * MIB)
    if "api_key" not in args and os.environ.get("CLIPFORGE_API_KEY"):
        base["api_key"] = os.environ["CLIPFORGE_API_KEY"]
    cfg = from_args(ServeConfig, args, base=base)
    cfg.api_key = cfg.api_key or None
    return cfg


def make_service(args: argparse.Namespace) -> Any:
    """Parsed ``serve`` arguments -> a ready ClipService (raises ValueError/FileNotFoundError on bad input)."""
    from clipforge.export.runtime import load_runtime
    from clipforge.index.store import ClipIndex
    from clipforge.serve.service import ClipService

    cfg = serve_config(args)
    index = ClipIndex.load(args.index) if args.index else None
    spec = args.model or (index.model_ref if index is not None else None)
    if spec is None:
        raise ValueError("give a MODEL or an --index (whose model is then used)")
    if index is not None and args.model and args.model != index.model_ref:
        log.warning("serving model %s with an index built by %s", args.model, index.model_ref)
    model = load_runtime(spec, cfg.runtime, getattr(args, "threads", None), cfg.onnx_dir)
    return ClipService(model, index, cfg)


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
