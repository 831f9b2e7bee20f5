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
    ("export", "clipforge.export.cli"),
    ("quickstart", "clipforge.quickstart"),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``command`` given) one with only that stage registered.

    Registering a stage imports its CLI module; importing all of them costs ~300 MB and a second for
    every ``clipforge data ingest``, so ``main`` registers only the stage it is about to run.
    """
    p = argparse.ArgumentParser(prog="clipforge", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in STAGES:
        if command is None or name == command:
            importlib.import_module(module).register(sub)
    return p


def _command_of(argv: list[str]) -> str | None:
    """The stage named by ``argv`` (first non-option word), if it is one of ours."""
    names = {name for name, _ in STAGES}
    for a in argv:
        if not a.startswith("-"):
            return a if a in names else None
    return None


def main(argv: list[str] | None = None) -> int:
    from clipforge.runtime import tune_allocator

    tune_allocator()  # before any tensor exists; children inherit it through the environment
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
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
