from __future__ import annotations

import io

import numpy as np
from curate_testutils import image_bytes, reencode
from PIL import Image

from clipforge.curate.hashing import dhash, hamming, phash, to_bytes
from clipforge.curate.image import image_stage
from clipforge.curate.stages import Context, CurateConfig
from clipforge.curate.text import caption_stats, nonalpha_fraction, repeated_token_ratio, text_stage


def ctx() -> Context:
    return Context(CurateConfig(stages=["text", "image"]))


def batch(caps, imgs=None):
    n = len(caps)
    imgs = imgs or [image_bytes(i) for i in range(n)]
    return {
        "key": [f"k{i}" for i in range(n)],
        "shard": ["s"] * n,
        "image_bytes": imgs,
        "image_ext": ["jpg"] * n,
        "caption": caps,
    }


def test_caption_stats_flags_junk():
    lex = {"dog", "ball", "grass"}
    clean = caption_stats("A dog chases balls on the grass", lex)
    assert clean["caption_words"] == 7 and not clean["has_url"] and not clean["has_html"]
    assert clean["visual_nouns"] == 3  # "balls" -> "ball"
    assert abs(clean["concreteness"] - 3 / 7) < 1e-9
    spam = caption_stats("buy buy buy now www.deals.com <b>sale</b> &amp;", lex)
    assert spam["has_url"] and spam["has_html"]
    assert spam["repeat_ratio"] > clean["repeat_ratio"]
    assert caption_stats("", lex)["caption_words"] == 0
    assert repeated_token_ratio(["a", "a", "a", "a"]) == 0.75
    assert nonalpha_fraction("ab12") == 0.5


def test_text_stage_language_and_nulls():
    cols = text_stage(
        batch(["A dog runs through the snow .", "Un chien court dans la neige avec son maître.", None]), ctx()
    )
    assert cols["lang"][:2] == ["en", "fr"]
    assert cols["lang"][2] is None and cols["caption_words"][2] == 0
    assert all(len(v) == 3 for v in cols.values())


def test_phash_robust_to_reencode_but_separates_images():
    a = image_bytes(1, size=64)
    im = lambda b: Image.open(io.BytesIO(b)).convert("RGB")  # noqa: E731
    near = reencode(a, 100, quality=60)
    assert hamming(phash(im(a)), phash(im(near))) <= 4
    assert hamming(dhash(im(a)), dhash(im(near))) <= 8
    far = [hamming(phash(im(a)), phash(im(image_bytes(s, size=64)))) for s in range(2, 12)]
    assert min(far) > 8
    codes = to_bytes(np.array([phash(im(a))], dtype=np.int64))
    assert codes.shape == (1, 8) and codes.dtype == np.uint8


def test_image_stage_blank_corrupt_and_sizes():
    imgs = [
        image_bytes(0, size=40),
        image_bytes(0, color=(30, 30, 30)),
        b"garbage",
        None,
        image_bytes(3, size=40, fmt="PNG"),
    ]
    cols = image_stage(batch(["c"] * 5, imgs), ctx())
    assert cols["image_valid"] == [True, True, False, False, True]
    assert cols["is_blank"][:2] == [False, True]
    assert cols["image_error"][2] == "corrupt_image" and cols["image_error"][3] == "missing_image"
    assert cols["width"][0] == 40 and cols["aspect"][0] == 1.0
    assert cols["image_format"][0] == "JPEG" and cols["image_format"][4] == "PNG"
    assert cols["phash"][2] is None and cols["sha256"][3] is None
    assert cols["sha256"][0] != cols["sha256"][4]
