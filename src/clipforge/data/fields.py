"""A sample's caption(s) and label from its members: the one rule every command uses.

Training (data/decode.py), curation (curate/engine.py) and indexing (index/embed.py) all read captions
and labels through this module, so "the caption of sample K" means the same thing everywhere.

The rule, in order (first match wins, later sources are never consulted once an earlier one exists):

caption
    1. the text member ``KEY.txt``, else ``KEY.caption``, else ``KEY.text``;
    2. else the first string of ``KEY.json["captions"]`` (a list);
    3. else ``KEY.json["caption"]`` (a string).
    A present but unusable source (not UTF-8, empty, longer than ``max_chars``) is an error with its
    reason; it never falls through to a later source, so a broken ``KEY.txt`` is reported, not masked.
captions (all captions of a sample, e.g. Flickr8k's five)
    the stripped, non-empty strings of ``KEY.json["captions"]`` no longer than ``max_chars``; when
    there are none, ``[caption]``.
label
    1. ``KEY.cls`` as decimal text (``" 3\\n"`` -> 3);
    2. else ``KEY.json["label"]`` when it is an int (not a bool) or a decimal string.
    It must fit int64 (every consumer stores it as int64). Absent: ``missing_label``; present but not
    an integer or out of range: ``bad_label``.

Callers that require a field (training) turn an error into a skipped sample; callers for which the
field is optional (indexing a CIFAR shard without captions) keep ``None`` and may report the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from clipforge.data.skip import SkipSample

TEXT_EXTS = ("txt", "caption", "text")
LABEL_EXTS = ("cls",)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class FieldError(SkipSample):
    """A caption/label source is absent or unusable; ``reason`` is the bad-sample reason.

    A :class:`SkipSample`, so code that skips bad samples needs no extra ``except``.
    """


def parse_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """``KEY.json`` as a dict ({} when absent); raise FieldError("bad_json") when it is not an object."""
    raw = sample.get("json")
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        meta = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except Exception as e:
        raise FieldError("bad_json", f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise FieldError("bad_json", "KEY.json is not an object")
    return meta


def raw_caption(sample: dict[str, Any], meta: dict[str, Any] | None = None) -> bytes | None:
    """The caption's bytes by the rule above (None when no source exists); ``meta`` = parsed KEY.json."""
    for ext in TEXT_EXTS:
        if ext in sample:
            v = sample[ext]
            return v if isinstance(v, bytes) else str(v).encode("utf-8")
    if meta is None:
        try:
            meta = parse_meta(sample)
        except FieldError:
            return None
    caps = meta.get("captions")
    if isinstance(caps, list):
        first = next((c for c in caps if isinstance(c, str)), None)
        if first is not None:
            return first.encode("utf-8")
    cap = meta.get("caption")
    if isinstance(cap, str):
        return cap.encode("utf-8")
    return None


def check_text(data: bytes | None, max_chars: int = 10_000) -> str:
    """Decode and validate one caption: missing, non-UTF-8, empty and over-long ones are errors."""
    if data is None:
        raise FieldError("missing_caption")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FieldError("caption_not_utf8", str(e)[:200]) from None
    text = text.strip()
    if not text:
        raise FieldError("empty_caption")
    if len(text) > max_chars:
        raise FieldError("caption_too_long", f"{len(text)} chars > {max_chars}")
    return text


def resolve_caption(
    sample: dict[str, Any], meta: dict[str, Any] | None = None, max_chars: int = 10_000
) -> str:
    """The sample's caption, or FieldError with the reason."""
    return check_text(raw_caption(sample, meta), max_chars)


def resolve_captions(meta: dict[str, Any], caption: str | None, max_chars: int = 10_000) -> list[str]:
    """All captions: valid ``KEY.json["captions"]`` entries, else ``[caption]`` (``[]`` without one)."""
    caps = meta.get("captions")
    out = []
    if isinstance(caps, list):
        out = [c.strip() for c in caps if isinstance(c, str) and c.strip() and len(c.strip()) <= max_chars]
    return out or ([caption] if caption is not None else [])


def _to_label(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str, bytes)):
        raise FieldError("bad_label", f"not an integer: {str(v)[:50]!r}")
    if isinstance(v, bytes):
        try:
            v = v.decode("ascii")
        except UnicodeDecodeError:
            raise FieldError("bad_label", "not ASCII") from None
    if isinstance(v, str):
        s = v.strip()
        if not s or len(s) > 20 or not s.lstrip("+-").isdigit():
            raise FieldError("bad_label", f"not an integer: {s[:50]!r}")
        v = int(s)
    if not INT64_MIN <= v <= INT64_MAX:
        raise FieldError("bad_label", f"{str(v)[:30]} does not fit int64")
    return v


def resolve_label(sample: dict[str, Any], meta: dict[str, Any] | None = None) -> int:
    """The sample's integer label by the rule above, or FieldError(missing_label | bad_label)."""
    for ext in LABEL_EXTS:
        if ext in sample:
            return _to_label(sample[ext])
    if meta is None:
        meta = parse_meta(sample)
    if "label" in meta and meta["label"] is not None:
        return _to_label(meta["label"])
    raise FieldError("missing_label")


@dataclass
class SampleFields:
    """Caption(s)/label of one sample; ``errors`` maps a field to its bad-sample reason when unusable."""

    meta: dict[str, Any] = field(default_factory=dict)
    caption: str | None = None
    captions: list[str] = field(default_factory=list)
    label: int | None = None
    errors: dict[str, FieldError] = field(default_factory=dict)


def sample_fields(
    sample: dict[str, Any], max_chars: int = 10_000, caption: bool = True, label: bool = True
) -> SampleFields:
    """Resolve everything without raising: unusable fields are None with their reason in ``errors``.

    A bad ``KEY.json`` leaves ``meta`` empty (``errors["json"]``) and resolves from the other members.
    """
    out = SampleFields()
    try:
        out.meta = parse_meta(sample)
    except FieldError as e:
        out.errors["json"] = e
    if caption:
        try:
            out.caption = resolve_caption(sample, out.meta, max_chars)
        except FieldError as e:
            out.errors["caption"] = e
        out.captions = resolve_captions(out.meta, out.caption, max_chars)
    if label:
        try:
            out.label = resolve_label(sample, out.meta)
        except FieldError as e:
            out.errors["label"] = e
    return out
