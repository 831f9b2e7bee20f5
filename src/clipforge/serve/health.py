"""``GET /health``: open to anyone (load balancers, the web page), so without the API key it tells
what a client needs (model name, index size, limits in force) but no server-side paths; a request
carrying the configured key gets the full view, index directory included."""

from __future__ import annotations

import re
import time
from typing import Any

from clipforge.serve.service import ClipService

# an absolute path (POSIX, ~, or a Windows drive) starting a spec or following a separator in one
_ABS_PATH = re.compile(r"(^|[\s:+=,;(])((?:~|[A-Za-z]:)?[/\\][^\s+,;)]*)")


def strip_paths(text: str) -> str:
    """``"hf:/srv/models/minilm"`` -> ``"hf:minilm"``: absolute paths cut to their last component."""

    def last(m: re.Match) -> str:
        return m.group(1) + (re.split(r"[/\\]", m.group(2).rstrip("/\\"))[-1] or "...")

    return _ABS_PATH.sub(last, text)


def _index_view(service: ClipService, full: bool) -> dict[str, Any] | None:
    if service.index is None:
        return None
    d = service.index.describe()
    if not full:
        d.pop("path", None)
        d = {k: strip_paths(v) if isinstance(v, str) else v for k, v in d.items()}
    return d


def _captioning_view(service: ClipService, full: bool) -> dict[str, Any]:
    cfg, cap = service.cfg, service.captioner
    if cap is None:
        return {
            "enabled": False,
            "detail": "started without --captioner DIR: POST /caption answers 404 captioning_off",
        }
    enc = cap.meta.get("encoder", {})
    where = cfg.captioner or "(in memory)"
    return {
        "enabled": True,
        "captioner": where if full else strip_paths(where),
        "mode": cap.mode,
        "condition": cap.condition,
        "encoder_fingerprint": enc.get("fingerprint"),
        "vocab_size": len(cap.vocab),
        "limits": {
            "max_beams": cfg.max_caption_beams,
            "max_length": min(cfg.max_caption_length, cap.decoder.cfg.max_len - 1),
            "max_captions": cfg.max_captions,
        },
    }


def health_payload(service: ClipService, full: bool) -> dict[str, Any]:
    """The /health body; ``full`` only for a request that carried the configured API key."""
    cfg = service.cfg
    spec = service.model.config.spec
    return {
        "status": "ok",
        "model": spec if full else strip_paths(spec),
        "embed_dim": service.model.config.embed_dim,
        "index": _index_view(service, full),
        "model_matches_index": service.model_matches_index,
        "captioning": _captioning_view(service, full),
        "runtime": service.runtime,
        "precision": {"text": service.precision, "image": service.image_precision},
        "batching": {"enabled": cfg.batching, "max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms},
        "stats": service.stats(),
        "api_key_required": bool(cfg.api_key),
        "uptime_s": round(time.time() - service.started, 1),
    }
