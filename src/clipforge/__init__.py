"""clipforge: raw image-text pairs -> shards -> curate -> train -> evaluate -> index + serve."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(spec_or_dir: str, **kwargs: Any):
    """Load any clipforge model (``towers:IMG+TXT``, ``hf:PATH``, ``scratch:NAME`` or a saved dir)."""
    from clipforge.models import load_model as _load

    return _load(spec_or_dir, **kwargs)


def train(config: Any):
    """Train a model from a :class:`clipforge.train.TrainConfig` (or a dict / YAML path)."""
    from clipforge.train import train as _train

    return _train(config)


__all__ = ["__version__", "load_model", "train"]
