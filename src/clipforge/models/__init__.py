"""Models: one interface (:class:`ClipModel`) over the backends of one table, and saved dirs.

load_model("towers:efficientnet-lite0+minilm-l6", unlock_text=2)  # pretrained towers + heads
load_model("hf:/ckpts/clip-vit-base-patch32")                     # transformers CLIP / SigLIP
load_model("scratch:vit-b-32")                                     # random init
load_model("py:my_models:make_model", width=64)                    # a factory of your own
load_model("runs/exp1/model")                                      # a dir written by model.save()

Where things are: spec.py parses the spec, registry.py maps its prefix to a backend module,
factory.py builds / loads, io.py writes and checks saved dirs, base.py is the interface.
Names are exported lazily (module ``__getattr__``) so importing the package costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClipModel": "clipforge.models.base",
    "Features": "clipforge.models.types",
    "ModelConfig": "clipforge.models.types",
    "ModelSpec": "clipforge.models.spec",
    "parse_spec": "clipforge.models.spec",
    "BACKENDS": "clipforge.models.registry",
    "Backend": "clipforge.models.registry",
    "register_backend": "clipforge.models.registry",
    "build_config": "clipforge.models.factory",
    "load_model": "clipforge.models.factory",
    "load_saved": "clipforge.models.factory",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def list_models() -> list[str]:
    """Spec strings that work offline out of the box (plus ``hf:DIR`` and ``towers:hf-*=DIR`` forms)."""
    from clipforge.models.scratch import CONFIGS

    return [
        "towers:efficientnet-lite0+minilm-l6",
        *(f"scratch:{n}" for n in CONFIGS),
        "hf:PATH_OR_ID",
        "towers:hf-image=DIR+hf-text=DIR",
    ]


__all__ = [*_EXPORTS, "list_models"]
