"""Curation: score, filter, dedup and balance image-text pairs (``clipforge curate run|filter|report|threshold``).

Stages are batch functions registered by name (:mod:`clipforge.curate.registry`, resolved by
:mod:`clipforge.curate.plan`); the local engine (:mod:`clipforge.curate.engine`) and the Ray engine
(:mod:`clipforge.curate.ray_engine`) run the same ones through :func:`clipforge.curate.shard.process_shard`.
Filters (:mod:`clipforge.curate.filter`) are safe expressions over the score columns (never ``eval``).

Quick use::

    from clipforge.curate import CurateConfig, run_curation, filter_run
    run_curation(["shards/*.tar"], "runs/scores", CurateConfig(stages=["text", "image", "dedup"]))
    filter_run("runs/scores", ["not is_duplicate", "caption_words >= 3"], "runs/curated")

Near copies: add the ``copy`` stage (``--stages clip-score,text,image,copy,dedup``): frozen pre-head
descriptors, threshold calibrated on synthetic copies of the data (:mod:`clipforge.curate.copydetect`),
combined with pHash by ``dedup.near_rule``. A label-free clip-score cut: ``curate threshold`` or the
filter ``clip_score > auto`` (:mod:`clipforge.curate.threshold`).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "CurateConfig": "clipforge.curate.config",
    "DedupConfig": "clipforge.curate.config",
    "BalanceConfig": "clipforge.curate.config",
    "Context": "clipforge.curate.registry",
    "register_stage": "clipforge.curate.registry",
    "resolve_stages": "clipforge.curate.plan",
    "run_curation": "clipforge.curate.engine",
    "FilterError": "clipforge.curate.filter",
    "apply_filters": "clipforge.curate.filter",
    "parse_filter": "clipforge.curate.filter",
    "filter_run": "clipforge.curate.reshard",
    "build_report": "clipforge.curate.report",
    "auto_threshold": "clipforge.curate.threshold",
    "calibrate_threshold": "clipforge.curate.copydetect",
    "synthetic_copy": "clipforge.curate.copydetect",
}
_RENAMED = {"parse_filter": "parse"}


def __getattr__(name: str) -> Any:
    """Lazy exports: ``import clipforge.curate`` must not pull in torch/pyarrow for the CLI's --help."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'clipforge.curate' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
