"""Callbacks into the training loop at fixed points of a run (tests use them to record and to kill).

Passed as ``train(cfg, hooks=TrainHooks(...))`` rather than read from environment variables, so the
loop has no test-only branches and a hook is explicit at its call site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainHooks:
    # (step about to run, 1-based; its batch, still on the CPU; this rank)
    on_batch: Callable[[int, dict[str, Any], int], None] | None = None
    # (step just finished, after its metrics row and its checkpoint if one was due)
    on_step_end: Callable[[int], None] | None = None
