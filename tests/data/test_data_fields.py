"""The one caption/label rule (data/fields.py), applied the same way by decode_sample."""

from __future__ import annotations

import json

import pytest
from data_testutils import image_bytes

from clipforge.data.decode import DecodeConfig, SkipSample, decode_sample
from clipforge.data.fields import FieldError, raw_caption, resolve_label, sample_fields


def _s(**members) -> dict:
    out = {"__key__": "k"}
    for k, v in members.items():
        out[k] = json.dumps(v).encode() if k == "json" else (v.encode() if isinstance(v, str) else v)
    return out


@pytest.mark.parametrize(
    "members, caption",
    [
        ({"txt": "from txt", "json": {"captions": ["a"], "caption": "b"}}, "from txt"),
        ({"caption": "from .caption", "json": {"caption": "b"}}, "from .caption"),
        ({"json": {"captions": [3, "first str"], "caption": "b"}}, "first str"),
        ({"json": {"caption": "json caption"}}, "json caption"),
        ({"json": {"other": 1}}, None),
        ({}, None),
    ],
)
def test_caption_order(members: dict, caption: str | None) -> None:
    raw = raw_caption(_s(**members))
    assert (raw.decode() if raw is not None else None) == caption


def test_broken_txt_is_reported_not_masked_by_json() -> None:
    f = sample_fields(_s(txt=b"\xff\xfe", json={"captions": ["fine"]}))
    assert f.caption is None and f.errors["caption"].reason == "caption_not_utf8"
    assert f.captions == ["fine"]


@pytest.mark.parametrize(
    "members, label",
    [
        ({"cls": " 3\n", "json": {"label": 7}}, 3),
        ({"json": {"label": 7}}, 7),
        ({"json": {"label": "8"}}, 8),
        ({"cls": "x", "json": {"label": 7}}, "bad_label"),
        ({"json": {"label": True}}, "bad_label"),
        ({"json": {"label": 10**30}}, "bad_label"),
        ({"cls": str(10**30)}, "bad_label"),
        ({"json": {}}, "missing_label"),
    ],
)
def test_label_rule(members: dict, label) -> None:
    s = _s(**members)
    if isinstance(label, int):
        assert resolve_label(s) == label
    else:
        with pytest.raises(FieldError) as e:
            resolve_label(s)
        assert e.value.reason == label
        assert isinstance(e.value, SkipSample)


def test_decode_sample_uses_the_rule() -> None:
    jpg = image_bytes()
    # json "caption" alone is now a caption for training too (index already used it)
    out = decode_sample(_s(jpg=jpg, json={"caption": "only in json", "label": 2}), DecodeConfig(label=True))
    assert out["caption"] == "only in json" and out["captions"] == ["only in json"] and out["label"] == 2
    with pytest.raises(SkipSample) as e:
        decode_sample(_s(jpg=jpg, txt="c", cls=str(2**70)), DecodeConfig(label=True))
    assert e.value.reason == "bad_label"
