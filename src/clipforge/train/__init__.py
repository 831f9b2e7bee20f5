"""Training: CLIP/SigLIP losses, AdamW + cosine, GradCache accumulation, locked-tower feature cache,
DDP-style data parallelism under torchrun, atomic checkpoints with exact resume.

Python API::

    from clipforge.train import TrainConfig, train, fit
    result = train({"model": "towers:efficientnet-lite0+minilm-l6", "data": ["shards/train-{000000..000005}.tar"],
                    "output": "runs/lit", "epochs": 5, "batch_size": 256})
    model = fit(model, "shards/*.tar", TrainConfig(epochs=5, output="runs/lit"))

Names are exported lazily (module ``__getattr__``, as in clipforge.models) so importing the package
costs nothing until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "clipforge.train.config",
    "TrainHooks": "clipforge.train.hooks",
    "Trainer": "clipforge.train.loop",
    "fit": "clipforge.train.loop",
    "train": "clipforge.train.loop",
    "ClipLoss": "clipforge.train.loss",
    "SigLipLoss": "clipforge.train.loss",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = list(_EXPORTS)
