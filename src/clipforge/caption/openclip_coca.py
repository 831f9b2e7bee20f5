"""An open_clip CoCa checkpoint as a captioner: what ``Captioner`` offers, over the model's own decoder.

``load_captioner("openclip:DIR")`` (or a saved clipforge dir of such a model) gives an object with the
:class:`~clipforge.caption.captioner.Captioner` surface that ``caption run``, ``model.caption(images)``
and evaluation use (``candidates``, ``caption``, ``caption_images``, ``shard_conditions``,
``load_encoder``, ``ids``, ``meta``, ``condition``, ``mode``); any other spec or dir is a saved
captioner, loaded by :meth:`Captioner.load` as before. Decoding is the caption stage's one
implementation (:func:`clipforge.caption.decoding.generate_candidates`) driving the model's
:class:`~clipforge.models.openclip_coca.CocaDecoder`; words come back through the model's tokenizer
(CLIP's BPE for the released checkpoints: SOT ``<|startoftext|>``, EOT ``<|endoftext|>``, pad 0).

The condition is ``spatial``: the image tokens [N, T, D] the multimodal decoder cross-attends to,
computed through the one shard loop (:func:`clipforge.caption.spatial.shard_spatial_conditions`, fed
a view of the model whose ``image_features`` are those tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.caption.decoding import DecodeOptions, SpecialIds, generate_candidates

SOT, EOT = "<|startoftext|>", "<|endoftext|>"


def is_coca_spec(spec: str | Path) -> bool:
    """``openclip:...`` with a multimodal_cfg, or a saved clipforge dir of such a model."""
    s = str(spec)
    if s.startswith("openclip:"):
        return True
    cfg = Path(s) / "config.json"
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return raw.get("backend") == "openclip" and (raw.get("options") or {}).get("model_type") == "coca"


def load_captioner(spec: str | Path) -> Any:
    """The captioner ``caption run --captioner SPEC`` names: an open_clip CoCa (``openclip:DIR``, or a
    saved dir of one) through :class:`OpenClipCocaCaptioner`, else a saved captioner dir."""
    if is_coca_spec(spec):
        from clipforge.models import load_model

        model = load_model(str(spec))
        cap = getattr(model, "captioner", None)
        if not isinstance(cap, OpenClipCocaCaptioner):
            raise ValueError(
                f"{spec}: an open_clip checkpoint without a text decoder (no multimodal_cfg) cannot caption"
            )
        return cap
    from clipforge.caption.captioner import Captioner

    return Captioner.load(spec)


class _CaptionTokenView(nn.Module):
    """The CoCa model as the spatial-token loop reads a model: locked, ``image_features`` = the
    decoder's image tokens (never trained through this view)."""

    image_locked = True

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model
        self.preprocess = model.preprocess
        self.config = model.config

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.inner.caption_tokens(pixels)}


class OpenClipCocaCaptioner:
    """Captioner surface over an :class:`~clipforge.models.openclip_coca.OpenClipCocaModel` (it is
    that model's ``captioner``; its weights are the model's own, so saving it writes nothing)."""

    condition = "spatial"
    mode = "paired"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.directory: Path | None = None

    @property
    def decoder(self) -> Any:
        return self.model.caption_decoder

    @property
    def meta(self) -> dict[str, Any]:
        return {"encoder": {"model": self.model.config.spec, "condition": self.condition}, "mode": self.mode}

    @property
    def ids(self) -> SpecialIds:
        tok = self.model.tokenizer
        backend = getattr(tok, "backend", None)
        sot = backend.token_to_id(SOT) if backend is not None else None
        eot = backend.token_to_id(EOT) if backend is not None else None
        if sot is None or eot is None:
            raise ValueError(
                f"{self.model.config.spec}: the tokenizer has no {SOT} / {EOT} tokens (CLIP's BPE): "
                "cannot start or stop a caption"
            )
        pad = int(self.model.pad_token_id)
        return SpecialIds(bos=int(sot), eos=int(eot), pad=pad, unk=pad)  # CLIP BPE has no unknown word

    def save(self, directory: str | Path) -> Path:
        """Nothing to write: the decoder is part of the model's own weights (saved with it)."""
        return Path(directory)

    def load_encoder(self, spec: str | None = None) -> Any:
        if spec and str(spec) != self.model.config.spec:
            raise ValueError(
                f"an open_clip CoCa captions with its own towers; --encoder {spec} cannot replace them"
            )
        return self.model

    def decode_words(self, ids: list[int]) -> str:
        backend = self.model.tokenizer.backend
        return " ".join(backend.decode(list(ids), skip_special_tokens=True).split())

    def candidates(
        self, cond: torch.Tensor, opts: DecodeOptions, decap_temperature: float | None = None
    ) -> tuple[list[list[str]], list[list[float]]]:
        """Image tokens [N, T, D] -> ``opts.num_candidates`` captions per row (best first), scores."""
        del decap_temperature  # paired: no DeCap projection
        ids = self.ids
        seqs, scores = generate_candidates(self.decoder, cond.float(), opts, ids)
        return [[self.decode_words(s) for s in row] for row in seqs], scores

    def caption(
        self, cond: torch.Tensor, opts: DecodeOptions, decap_temperature: float | None = None
    ) -> tuple[list[str], list[float]]:
        opts = DecodeOptions(**{**opts.__dict__, "num_candidates": 1})
        texts, scores = self.candidates(cond, opts)
        return [t[0] for t in texts], [s[0] for s in scores]

    def caption_images(
        self, encoder: Any, images: list[Any], opts: DecodeOptions, decap_temperature: float | None = None
    ) -> list[str]:
        if not images:
            return []
        return self.caption(self.image_conditions(encoder, images), opts)[0]

    def image_conditions(self, encoder: Any, images: list[Any]) -> torch.Tensor:
        from clipforge.caption.spatial import image_spatial_conditions

        return image_spatial_conditions(_CaptionTokenView(self._own(encoder)), images)

    def shard_conditions(self, encoder: Any, shards: str | list[str], **kw: Any) -> Any:
        from clipforge.caption.spatial import shard_spatial_conditions

        return shard_spatial_conditions(_CaptionTokenView(self._own(encoder)), shards, **kw)

    def _own(self, encoder: Any) -> Any:
        if encoder is not None and encoder is not self.model:
            raise ValueError("an open_clip CoCa reads its own image tokens: pass the model itself as encoder")
        return self.model
