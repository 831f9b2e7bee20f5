"""The one table from spec prefix to backend (open_clip's factory.py idea), and the backend protocol.

A backend is a module, imported on first use (``clipforge --help`` stays fast), that defines:

- ``OPTIONS: dict[str, str]``: the valid ``load_model`` / ``--model-opt`` keys with a one-line help
  (``None``: the backend checks its options itself, e.g. against a factory's signature);
- ``build_config(spec: ModelSpec, **options) -> ModelConfig``: resolve a spec (no weights loaded);
- ``build(config, tokenizer=None, pretrained=True) -> ClipModel``: construct the module for a config
  (``pretrained=False``: a skeleton that a saved dir's weights fill);
- or instead of the two, ``load(spec, **options) -> ClipModel`` for backends with no saved form.

Adding a backend (caption models, an open_clip format) is one :class:`Backend` entry here (or one
:func:`register_backend` call) plus its module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

SAVED = "saved"  # ModelSpec.backend of a saved model dir (its config.json names the real backend)


@dataclass(frozen=True)
class Backend:
    name: str  # the spec prefix, stored as ModelConfig.backend
    module: str  # the module implementing the protocol above
    syntax: str  # for help and error messages
    saved: bool = True  # can a saved dir's config.json name it (False: never rebuilt from a file)
    runs_code: bool = False  # the spec names code to import and call: honoured only with allow_code=True

    def resolve(self) -> ModuleType:
        return importlib.import_module(self.module)


BACKENDS: dict[str, Backend] = {
    "towers": Backend("towers", "clipforge.models.towers", "towers:IMAGE+TEXT"),
    "hf": Backend("hf", "clipforge.models.hf", "hf:PATH_OR_ID"),
    "scratch": Backend("scratch", "clipforge.models.scratch", "scratch:NAME"),
    "openclip": Backend("openclip", "clipforge.models.openclip", "openclip:DIR or openclip:NAME=FILE"),
    "py": Backend("py", "clipforge.models.custom", "py:MODULE:FUNCTION", saved=False, runs_code=True),
}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend: its prefix becomes a valid spec everywhere."""
    if backend.name == SAVED or not backend.name.isidentifier():
        raise ValueError(f"invalid backend name {backend.name!r}")
    BACKENDS[backend.name] = backend


def get_backend(name: str, *, saved: bool = False) -> Backend:
    """The table entry for ``name``; ``saved=True``: only backends a saved config may name."""
    b = BACKENDS.get(name)
    if b is None or (saved and not b.saved):
        valid = [n for n, x in BACKENDS.items() if x.saved or not saved]
        raise ValueError(f"unknown model backend {name!r} (valid: {', '.join(valid)})")
    return b
