"""The one parser of model spec strings: every command and the trainer go through :func:`parse_spec`.

    towers:IMAGE+TEXT                  towers:efficientnet-lite0+minilm-l6
                                       towers:hf-image=/ckpt/dinov2-small+hf-text=/ckpt/bert-mini
    hf:PATH_OR_ID                      a transformers CLIPModel / SiglipModel checkpoint
    scratch:NAME                       a named layout, random init (vit-nano ... vit-b-16)
    py:MODULE:FUNCTION                 a factory of your own, called with the options (trusted input)
    DIR                                a dir written by ``model.save()`` (config.json + model.safetensors)

The prefixes are the keys of :data:`clipforge.models.registry.BACKENDS`; a new backend adds an entry
there (and, when its body has structure, one branch here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipforge.models.registry import BACKENDS, SAVED

SPEC_HELP = "towers:IMAGE+TEXT, hf:PATH, scratch:NAME, openclip:DIR, py:MODULE:FUNCTION or a saved model dir"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: which backend, and its target (towers' two sides split out)."""

    backend: str  # a registry key, or "saved" for a saved model dir
    target: str  # what follows "backend:" (the dir for a saved model)
    image: str = ""  # towers only: efficientnet-lite0 | hf-image=DIR
    text: str = ""  # towers only: minilm-l6 | hf-text=DIR

    def __str__(self) -> str:
        if self.backend == SAVED:
            return self.target
        if self.backend == "towers":
            return f"towers:{self.image}+{self.text}"
        return f"{self.backend}:{self.target}"

    @property
    def path(self) -> Path:
        """The target as a path (hf checkpoints, saved dirs)."""
        return Path(self.target)


def parse_spec(spec: str | Path | ModelSpec) -> ModelSpec:
    """``str``/``Path`` -> :class:`ModelSpec`; raises ``ValueError`` naming the valid forms."""
    if isinstance(spec, ModelSpec):
        return spec
    text = str(spec)
    from clipforge.models.io import is_saved_model  # (io imports nothing that imports us)

    if is_saved_model(text):
        return ModelSpec(SAVED, text)
    prefix, sep, body = text.partition(":")
    if not sep or prefix not in BACKENDS:
        if Path(text).is_dir():
            raise FileNotFoundError(
                f"{text} is a dir but not a saved clipforge model (no config.json + model.safetensors)"
            )
        raise ValueError(f"unknown model spec {text!r}: use {SPEC_HELP}")
    if not body:
        raise ValueError(f"model spec {text!r} is empty after {prefix}: ({BACKENDS[prefix].syntax})")
    if prefix == "towers":
        image, text_side = _towers_sides(text, body)
        return ModelSpec("towers", f"{image}+{text_side}", image=image, text=text_side)
    if prefix == "py":
        module, _, fn = body.partition(":")
        if not module or not fn:
            raise ValueError(f"model spec {text!r}: use py:MODULE:FUNCTION")
    return ModelSpec(prefix, body)


def side_path(side: str) -> str | None:
    """The DIR of a towers side ``hf-image=DIR`` / ``hf-text=DIR``; None for a named tower."""
    kind, sep, path = side.partition("=")
    return path if sep and kind in ("hf-image", "hf-text") else None


def _towers_sides(spec: str, body: str) -> tuple[str, str]:
    if "+" not in body:
        raise ValueError(
            f"towers spec needs IMAGE+TEXT, got {spec!r} (e.g. towers:efficientnet-lite0+minilm-l6)"
        )
    if "+hf-text=" in body:  # an hf-image dir may itself hold a '+': split at the text side's marker
        image, text = body.split("+hf-text=", 1)
        return image, "hf-text=" + text
    image, text = body.rsplit("+", 1)
    return image, text
