"""Spec (or saved dir) + options -> model, through the one backend table (models/registry.py).

``load_model(spec_or_dir, **options)``: :func:`parse_spec` gives a ModelSpec; a saved dir goes to
:func:`load_saved` (config.json -> ``construct(pretrained=False)`` -> weights), any other spec has its
options checked against the backend's ``OPTIONS``, then ``build_config`` -> :func:`construct` (seeded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.config import ConfigError, check_keys
from clipforge.models.base import ClipModel
from clipforge.models.io import CAPTIONER, load_weights, read_saved
from clipforge.models.registry import SAVED, get_backend
from clipforge.models.spec import ModelSpec, parse_spec
from clipforge.models.tokenizer import Tokenizer
from clipforge.models.types import ModelConfig


def check_options(backend: str, options: dict[str, Any]) -> None:
    """Unknown option -> :class:`~clipforge.config.ConfigError` with a did-you-mean and the valid list."""
    valid = get_backend(backend).resolve().OPTIONS
    if valid is None:
        return
    try:
        check_keys(options, valid, f"{backend} model option")
    except ConfigError as e:
        if "(valid:" in str(e):
            raise
        raise ConfigError(f"{e}; valid {backend} options: {', '.join(sorted(valid))}") from None


def build_config(spec: str | ModelSpec, **options: Any) -> ModelConfig:
    """The :class:`ModelConfig` a spec + options resolve to (no weights loaded)."""
    parsed = parse_spec(spec)
    if parsed.backend == SAVED:
        raise ValueError(f"{parsed.target} is a saved model: its config is its config.json")
    mod = get_backend(parsed.backend).resolve()
    if not hasattr(mod, "build_config"):
        raise ValueError(f"{parsed.backend}: models have no config of their own (spec {spec!r})")
    check_options(parsed.backend, options)
    return mod.build_config(parsed, **options)


def construct(config: ModelConfig, tokenizer: Tokenizer | None = None, pretrained: bool = True) -> ClipModel:
    """The backend's module for ``config`` (``pretrained=False``: a skeleton to load weights into).

    Random init (heads, scratch weights) is seeded from the config, so the same spec + options
    always builds the same model: an index built with a spec can be searched by a fresh load of it.
    """
    import hashlib
    import json

    import torch

    mod = get_backend(config.backend, saved=True).resolve()
    seed = int(
        hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8], 16
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mod.build(config, tokenizer=tokenizer, pretrained=pretrained)


def load_saved(directory: str | Path) -> ClipModel:
    """Rebuild a model written by :func:`clipforge.models.io.save_model` (exact weights; eval mode)."""
    config, tokenizer, partial = read_saved(directory)
    model = construct(config, tokenizer=tokenizer, pretrained=partial)
    load_weights(model, directory, partial)
    if (Path(directory) / CAPTIONER).is_dir():  # trained with --loss coca: it captions too
        from clipforge.caption.captioner import Captioner

        model.captioner = Captioner.load(Path(directory) / CAPTIONER)
    return model.eval()


def load_model(spec_or_dir: str | Path | ModelSpec, *, allow_code: bool = False, **options: Any) -> ClipModel:
    """A ready model (eval mode) from a spec string or a saved dir; ``options`` go into the config.

    ``allow_code``: honour a spec that names code to run (``py:MODULE:FUNCTION``). Only for a spec the
    user gave (command line, API), never for one read back from a file (manifests, saved configs).
    """
    spec = parse_spec(spec_or_dir)
    if spec.backend == SAVED:
        if options:
            raise ValueError(f"options {sorted(options)} cannot change a saved model ({spec.target})")
        return load_saved(spec.target)
    backend = get_backend(spec.backend)
    if backend.runs_code and not allow_code:
        raise ValueError(
            f"model spec {str(spec)[:200]!r} imports and calls code: honoured only where a user gives it "
            "(clipforge train --model, or load_model(..., allow_code=True)), never from a file"
        )
    mod = backend.resolve()
    if hasattr(mod, "load"):  # no config of its own (py:MODULE:FUNCTION)
        return mod.load(spec, **options).eval()
    return construct(build_config(spec, **options)).eval()
