"""Test-only entry point: ``clipforge train`` with test hooks (run as a script, also under torchrun).

    python tests/train/train_with_hooks.py [--keys-log PATH] [--kill-at N] -- <clipforge train flags>

``--keys-log PATH`` appends each step's sample keys to ``PATH.rank<R>``; ``--kill-at N`` dies like
``kill -9`` right after step N (and its checkpoint). The hooks go in through ``train(cfg, hooks=...)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from clipforge.train.hooks import TrainHooks


def log_keys(path: str):
    def hook(step: int, batch: dict, rank: int) -> None:
        with open(f"{path}.rank{rank}", "a") as f:
            f.write(json.dumps({"step": step, "keys": batch["keys"], "texts": batch.get("texts")}) + "\n")

    return hook


def kill_at(n: int):
    def hook(step: int) -> None:
        if step == n:  # no cleanup, no flush
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: list[str]) -> int:
    from clipforge.cli import build_parser
    from clipforge.runtime import tune_allocator
    from clipforge.train.cli import run_cli

    pre = argparse.ArgumentParser()
    pre.add_argument("--keys-log")
    pre.add_argument("--kill-at", type=int, default=0)
    mine, rest = pre.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    tune_allocator()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    args = build_parser().parse_args(["train", *rest])
    hooks = TrainHooks(
        on_batch=log_keys(mine.keys_log) if mine.keys_log else None,
        on_step_end=kill_at(mine.kill_at) if mine.kill_at else None,
    )
    return run_cli(args, hooks)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
