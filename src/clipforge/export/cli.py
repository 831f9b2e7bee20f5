"""``clipforge export MODEL --format hf|onnx|openclip --output DIR``: argparse wiring only."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model as a transformers dir, an open_clip hub dir or two ONNX graphs (+ a model card)",
    )
    p.add_argument("model", help="model spec or saved model dir (e.g. runs/exp1/model)")
    p.add_argument("--format", required=True, choices=["hf", "onnx", "openclip"], help="export format")
    p.add_argument("--output", required=True, help="output dir (must be missing or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output dir")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument(
        "--quantize",
        choices=["none", "text", "all"],
        default="none",
        help="onnx: also write int8 (dynamic) copies of the text graph or of both graphs",
    )
    p.add_argument(
        "--eval-results",
        default=None,
        help="results.json for the model card (default: found beside the model)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.export.api import ExportError, export_model
    from clipforge.utils import OutputExistsError, emit_json

    options = {}
    if args.format == "onnx":
        options = {"quantize_int8": args.quantize, **({"opset": args.opset} if args.opset else {})}
    elif args.quantize != "none":
        print("clipforge export: error: --quantize applies to --format onnx only", file=sys.stderr)
        return 2
    try:
        summary = export_model(
            args.model,
            args.format,
            args.output,
            overwrite=args.overwrite,
            eval_results=args.eval_results,
            **options,
        )
    except (ExportError, OutputExistsError, FileNotFoundError, ValueError) as e:  # bad input: a message, rc 2
        print(f"clipforge export: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        emit_json(summary)
    else:
        print(
            f"exported {summary['spec']} as {args.format} to {summary['output']} ({len(summary['files'])} files)"
        )
    return 0
