"""clipforge: raw image-text pairs -> shards -> curate -> train -> evaluate -> index + serve."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(spec_or_dir: str, **kwargs: Any):
    """Load any clipforge model (``towers:IMG+TXT``, ``hf:PATH``, ``scratch:NAME`` or a saved dir)."""
    from clipforge.models import load_model as _load

    return _load(spec_or_dir, **kwargs)


# Training is ``from clipforge.train import train`` (a function here named ``train`` would be replaced by
# the ``clipforge.train`` subpackage as soon as anything imports it).
__all__ = ["__version__", "load_model"]
