"""``POST /caption`` on the model side: the captioner checked against the served model, and the batch
function the caption micro-batcher runs on the model thread.

A captioner reads vectors of one encoder (its CLIP embeddings, or the pooled features of its frozen image
tower); fed another model's vectors it writes fluent nonsense, so the server refuses to start when the
captioner's recorded encoder fingerprint (``models/encode.fingerprint``) is not the served model's.

Batching: the images of every request in a micro-batch are encoded together, then requests with the same
decoding settings are decoded together (one :func:`clipforge.caption.decoding.generate` call per group).
Sampling requests are decoded one request at a time (their ``num_captions`` rows together) because
``generate`` draws from one generator per chunk: a sampled caption then depends only on the request's
image, settings and seed, never on which other requests shared its batch.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.caption.captioner import Captioner, encoder_fingerprint
from clipforge.caption.decoding import DecodeOptions
from clipforge.caption.features import pool_features
from clipforge.caption.spatial import spatial_tokens
from clipforge.models.encode import embed_pixels, model_device


def check_captioner(captioner: Captioner, model: Any, where: str = "the captioner") -> None:
    """Raise ValueError (a one-line reason) unless ``captioner`` was trained on ``model``'s vectors."""
    enc = captioner.meta.get("encoder") or {}
    kind = enc.get("condition")
    if kind not in ("embedding", "features", "spatial"):
        raise ValueError(f"{where} records no usable encoder condition ({kind!r}): not a captioner dir?")
    if kind in ("features", "spatial") and not getattr(model, "image_locked", False):
        raise ValueError(
            f"{where} reads frozen image-tower {kind}, but the served model has no locked image tower"
        )
    want = enc.get("fingerprint")
    if not want:
        raise ValueError(f"{where} records no encoder fingerprint: cannot check it was trained on this model")
    got = encoder_fingerprint(model, kind)
    if got != want:
        raise ValueError(
            f"{where} was trained on {enc.get('model', '?')} (encoder fingerprint {want}) but the served "
            f"model {model.config.spec} has fingerprint {got}: its captions would be meaningless; serve "
            "the model the captioner was trained on, or train a captioner on this one"
        )
    if kind == "embedding" and int(model.config.embed_dim) != captioner.decoder.cfg.cond_dim:
        raise ValueError(
            f"{where} expects {captioner.decoder.cfg.cond_dim}-d embeddings, the model gives "
            f"{model.config.embed_dim}-d"
        )


def load_captioner(directory: str | Path, model: Any) -> Captioner:
    """A captioner dir, loaded and checked against the served model (ValueError on mismatch)."""
    try:
        cap = Captioner.load(directory)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"cannot load captioner {directory}: {e}") from None
    check_captioner(cap, model, f"captioner {directory}")
    cap.decoder.eval()
    return cap


@dataclass
class CaptionJob:
    """One /caption request on the model thread: its pixels, decoding settings and caption count."""

    pixels: torch.Tensor
    opts: DecodeOptions
    num: int = 1


@dataclass
class CaptionResult:
    texts: list[str]
    scores: list[float | None]


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def batch_key(opts: DecodeOptions) -> tuple:
    """Requests whose settings have the same key are decoded in one ``generate`` call."""
    return astuple(replace(opts, batch_size=1))


class CaptionEngine:
    """``engine(jobs) -> results`` for the micro-batcher: encode all images, decode per settings group."""

    def __init__(
        self, captioner: Captioner, model: Any, precision: str = "fp32", image_batch: int = 1
    ) -> None:
        self.captioner, self.model, self.precision = captioner, model, precision
        self.image_batch = max(1, image_batch)

    @torch.inference_mode()
    def conditions(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """[N, C] condition vectors (``spatial``: [N, T, C] tokens) of ``pixels`` (chunks of ``image_batch``: CPU convnets slow down
        per image in big batches, see service.py)."""
        out = []
        for s in range(0, len(pixels), self.image_batch):
            px = torch.stack(pixels[s : s + self.image_batch])
            if self.captioner.condition == "spatial":  # image tokens [n, T, C] (cross-attention decoder)
                out.append(spatial_tokens(self.model, px.to(model_device(self.model))).cpu())
            elif self.captioner.condition == "features":
                feats = self.model.image_features(px.to(model_device(self.model)))
                out.append(pool_features(feats).float().cpu())
            else:
                out.append(torch.from_numpy(np.asarray(embed_pixels(self.model, px, self.precision))))
        return torch.cat(out).float()

    def probe(self) -> None:
        """Caption one blank image at startup: a condition-width mismatch (frozen features) fails here,
        with a clear message, rather than on the first request."""
        from PIL import Image

        cond = self.conditions([self.model.preprocess(Image.new("RGB", (64, 64)))])
        want = self.captioner.decoder.cfg.cond_dim
        if cond.shape[-1] != want:
            raise ValueError(
                f"the captioner expects {want}-d {self.captioner.condition} vectors, the model gives "
                f"{cond.shape[-1]}-d"
            )
        self._decode(cond, DecodeOptions(method="greedy", max_len=2, min_len=0))

    def _decode(self, cond: torch.Tensor, opts: DecodeOptions) -> tuple[list[str], list[float]]:
        return self.captioner.caption(cond, replace(opts, batch_size=max(1, cond.shape[0])))

    def __call__(self, jobs: list[CaptionJob]) -> list[Any]:
        cond = self.conditions([j.pixels for j in jobs])
        out: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            if j.opts.method == "sample":  # alone: its draws must not depend on its batch mates
                texts, scores = self._decode(cond[i : i + 1].expand(j.num, *cond.shape[1:]), j.opts)
                out[i] = CaptionResult(texts, [_finite(s) for s in scores])
            else:
                groups.setdefault(batch_key(j.opts), []).append(i)
        for rows in groups.values():
            texts, scores = self._decode(cond[rows], jobs[rows[0]].opts)
            for i, t, s in zip(rows, texts, scores):
                out[i] = CaptionResult([t], [_finite(s)])
        return out
