"""Models: one interface (:class:`ClipModel`) over three backends and saved dirs.

load_model("towers:efficientnet-lite0+minilm-l6", unlock_text=2)  # pretrained towers + heads
load_model("hf:/ckpts/clip-vit-base-patch32")                     # transformers CLIP / SigLIP
load_model("scratch:vit-b-32")                                     # random init
load_model("runs/exp1/model")                                      # a dir written by model.save()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.models.base import ClipModel, Features, ModelConfig

BACKENDS = ("towers", "hf", "scratch")


def build_config(spec: str, **options: Any) -> ModelConfig:
    """The :class:`ModelConfig` a spec + options resolve to (no weights loaded)."""
    backend = spec.split(":", 1)[0]
    if backend == "towers":
        from clipforge.models.towers import build_config as b
    elif backend == "hf":
        from clipforge.models.hf import build_config as b
    elif backend == "scratch":
        from clipforge.models.scratch import build_config as b
    else:
        raise ValueError(
            f"unknown model spec {spec!r}: use towers:IMAGE+TEXT, hf:PATH, scratch:NAME or a saved model dir"
        )
    return b(spec, **options)


def load_model(spec_or_dir: str | Path, **options: Any) -> ClipModel:
    """A ready model (eval mode) from a spec string or a saved dir; ``options`` go into the config."""
    from clipforge.models.io import build_model, is_saved_model, load_saved

    if is_saved_model(spec_or_dir):
        if options:
            raise ValueError(f"options {sorted(options)} cannot change a saved model ({spec_or_dir})")
        return load_saved(spec_or_dir)
    spec = str(spec_or_dir)
    if Path(spec).is_dir() and ":" not in spec:
        raise FileNotFoundError(
            f"{spec} is a dir but not a saved clipforge model (no config.json + model.safetensors)"
        )
    return build_model(build_config(spec, **options)).eval()


def list_models() -> list[str]:
    """Spec strings that work offline out of the box (plus ``hf:DIR`` and ``towers:hf-*=DIR`` forms)."""
    from clipforge.models.scratch import CONFIGS

    return [
        "towers:efficientnet-lite0+minilm-l6",
        *(f"scratch:{n}" for n in CONFIGS),
        "hf:PATH_OR_ID",
        "towers:hf-image=DIR+hf-text=DIR",
    ]


__all__ = ["BACKENDS", "ClipModel", "Features", "ModelConfig", "build_config", "list_models", "load_model"]
