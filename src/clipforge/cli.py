"""The ``clipforge`` command: a thin dispatcher; each stage registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (subcommand, module providing ``register(subparsers)``), in pipeline order.
STAGES = [
    ("data", "clipforge.data.cli"),
    ("curate", "clipforge.curate.cli"),
    ("caption", "clipforge.caption.cli"),
    ("train", "clipforge.train.cli"),
    ("eval", "clipforge.evaluate.cli"),
    ("index", "clipforge.index.cli"),
    ("serve", "clipforge.serve.cli"),
    ("quickstart", "clipforge.quickstart"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipforge", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _name, module in STAGES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from clipforge.runtime import tune_allocator

    tune_allocator()  # before any tensor exists; children inherit it through the environment
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
