"""Captioning: prefix-decoder captioners trained on CLIP vectors, one decoder, recaptioning, metrics.

A newcomer's path: :mod:`~clipforge.caption.vocab` (word vocabulary) -> :mod:`~clipforge.caption.decoder`
(condition -> prefix -> causal transformer, KV cache) -> :mod:`~clipforge.caption.decoding` (greedy,
beam, sampling: the one implementation) -> :mod:`~clipforge.caption.features` (condition vectors through
``models/encode.py`` and the locked-tower feature cache) -> :mod:`~clipforge.caption.train`
(paired / text-only) -> :mod:`~clipforge.caption.captioner` (the saved dir) -> :mod:`~clipforge.caption.run`
(Parquet side tables) and :mod:`~clipforge.caption.evaluate` (COCO metrics, CLIPScore, baselines).

Quick use::

    from clipforge.caption import train_captioner, Captioner, DecodeOptions, evaluate_captioning
    train_captioner({"data": ["train-{000000..000005}.tar"], "output": "runs/cap",
                     "model_opts": {"image_head": "multiscale"}})
    cap = Captioner.load("runs/cap/captioner")
    evaluate_captioning("runs/cap/captioner", "test-000000.tar", decode=DecodeOptions(method="beam"))
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "CaptionVocab": "clipforge.caption.vocab",
    "build_vocab": "clipforge.caption.vocab",
    "CaptionDecoder": "clipforge.caption.decoder",
    "DecoderConfig": "clipforge.caption.decoder",
    "DecodeOptions": "clipforge.caption.decoding",
    "generate": "clipforge.caption.decoding",
    "generate_candidates": "clipforge.caption.decoding",
    "Captioner": "clipforge.caption.captioner",
    "CaptionTrainConfig": "clipforge.caption.train",
    "train_captioner": "clipforge.caption.train",
    "CaptionRunConfig": "clipforge.caption.run",
    "run_captions": "clipforge.caption.run",
    "CaptionEvalConfig": "clipforge.caption.evaluate",
    "evaluate_captioning": "clipforge.caption.evaluate",
}


def __getattr__(name: str) -> Any:
    """Lazy exports: ``import clipforge.caption`` must not pull in torch for the CLI's --help."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipforge.caption' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
