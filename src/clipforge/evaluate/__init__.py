"""Evaluation: zero-shot, retrieval, linear probe, captioning, compositionality, robustness (``clipforge eval``).

Quick use::

    from clipforge.evaluate import evaluate
    report = evaluate(model, ["cifar10", "flickr8k"], output_dir="out/eval")

Submodules import torch; this package's ``cli`` module stays light for ``clipforge --help``.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "evaluate": "clipforge.evaluate.runner",
    "EvalConfig": "clipforge.evaluate.config",
    "run_zeroshot": "clipforge.evaluate.runner",
    "run_retrieval": "clipforge.evaluate.runner",
    "run_probe": "clipforge.evaluate.runner",
    "summary_rows": "clipforge.evaluate.runner",
    "headline_metrics": "clipforge.evaluate.runner",
    "retrieval_grid": "clipforge.evaluate.grid",
    "ImageSet": "clipforge.evaluate.embed",
    "embed_images": "clipforge.evaluate.embed",
    "embed_texts": "clipforge.evaluate.embed",
    "recall_at_k": "clipforge.evaluate.retrieval",
    "zeroshot_metrics": "clipforge.evaluate.zeroshot",
    "class_embeddings": "clipforge.evaluate.zeroshot",
    "load_templates": "clipforge.evaluate.zeroshot",
    "linear_probe": "clipforge.evaluate.probe",
    "DatasetSpec": "clipforge.evaluate.recipes",
    "builtin": "clipforge.evaluate.recipes",
    "default_data_root": "clipforge.evaluate.recipes",
    "probe_split": "clipforge.evaluate.recipes",
    "compare": "clipforge.evaluate.results",
    "CompositionalityConfig": "clipforge.evaluate.config",
    "RobustnessConfig": "clipforge.evaluate.config",
    "run_compositionality": "clipforge.evaluate.compositionality",
    "run_robustness": "clipforge.evaluate.robustness",
    "captioning_report": "clipforge.evaluate.captioning",
    "load_result": "clipforge.evaluate.results",
}


def __getattr__(name: str) -> Any:
    """Lazy exports: ``import clipforge.evaluate`` must not pull in torch for the CLI's --help."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipforge.evaluate' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
