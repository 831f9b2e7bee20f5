"""``py:MODULE:FUNCTION``: a model factory of your own, called with the options as keyword arguments.

The spec names code to import, so it is honoured only where a spec is given (command line, API);
a saved model's config.json can never name this backend (registry: ``saved=False``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from clipforge.config import check_keys
from clipforge.models.base import ClipModel
from clipforge.models.spec import ModelSpec

OPTIONS = None  # checked against the factory's own signature


def load(spec: ModelSpec, **options: Any) -> ClipModel:
    module, _, name = spec.target.partition(":")
    factory = getattr(importlib.import_module(module), name, None)
    if not callable(factory):
        raise ValueError(f"model spec {spec}: {module} has no callable {name!r}")
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        check_keys(options, params, f"{spec} model option")
    return factory(**options)
