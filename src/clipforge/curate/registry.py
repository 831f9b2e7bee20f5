"""The stage registry: a stage is a named batch function ``(batch, ctx) -> {column: values}``.

Why one tiny interface: the local engine and the Ray engine run the *same* functions, so a stage
written once runs on a laptop and on a cluster, and tests can call a stage directly on a hand-made
batch. Two kinds of stage exist:

- **sample** stages (``clip-score``, ``text``, ``image``, ``safety``) see a batch of samples of one
  shard, columnar: ``key``, ``shard``, ``image_bytes``, ``image_ext``, ``caption`` plus every column an
  earlier stage produced for that batch; they return new columns, one value per sample. Columns whose
  name starts with ``__`` (embeddings) are saved as ``.npy`` beside the score table, not in Parquet.
- **global** stages (``dedup``, ``balance``) need the whole shard set at once (clusters, counts); they
  take the merged score table (+ embeddings) instead and run after every shard is scored.

This module imports no stage: stage modules import it, and :mod:`clipforge.curate.plan` imports the
stage modules (so the import graph has no cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clipforge.curate.config import CurateConfig

Batch = dict[str, Any]
Columns = dict[str, Any]


class Context:
    """What stages share within one process: config, the model (loaded once, lazily), lexicons."""

    def __init__(self, config: CurateConfig, model: Any = None) -> None:
        self.config = config
        self._model = model
        self._cache: dict[str, Any] = {}
        self.timing: dict[str, float] = {}  # decode_s / model_s, for the throughput benchmark
        # key -> out-of-fold clip score (``curate run --folds K``: folds/oof.parquet); dedup keeps the
        # best of a duplicate group by it (an in-sample score rates a memorized pair as a good one)
        self.keep_scores: dict[str, float] | None = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from clipforge.models import load_model  # the one spec parser and backend table
            from clipforge.models.spec import SPEC_HELP

            if not self.config.model:
                raise ValueError(f"this stage needs a model: pass --model SPEC ({SPEC_HELP})")
            self._model = load_model(self.config.model).eval()
        return self._model

    def cached(self, name: str, build: Callable[[], Any]) -> Any:
        """Per-process memo for expensive read-only helpers (lexicon sets, prompt embeddings)."""
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]


@dataclass
class Stage:
    name: str
    fn: Callable[..., Columns]
    kind: str  # "sample" | "global"
    needs_model: bool = False
    requires: tuple[str, ...] = ()  # stages that must run before (their columns are inputs)
    doc: str = ""


STAGES: dict[str, Stage] = {}


def register_stage(
    name: str, kind: str = "sample", needs_model: bool = False, requires: tuple[str, ...] = ()
) -> Callable[[Callable[..., Columns]], Callable[..., Columns]]:
    """Decorator: make a batch function available to ``clipforge curate run --stages NAME``."""

    def deco(fn: Callable[..., Columns]) -> Callable[..., Columns]:
        STAGES[name] = Stage(name, fn, kind, needs_model, requires, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco
