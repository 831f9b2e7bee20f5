"""Embed shard sets, build a faiss index sized by a RAM budget, and search it by text or image.

Names are imported lazily so ``clipforge --help`` (which imports ``clipforge.index.cli``) stays fast.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "IndexPlan": "clipforge.index.ann",
    "plan_index": "clipforge.index.ann",
    "knn_recall": "clipforge.index.ann",
    "BuildOptions": "clipforge.index.build",
    "build_index": "clipforge.index.build",
    "read_manifest": "clipforge.index.build",
    "ClipIndex": "clipforge.index.store",
    "FilterError": "clipforge.index.store",
    "Hit": "clipforge.index.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipforge.index' has no attribute {name!r}")
