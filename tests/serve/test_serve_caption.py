"""POST /caption: the HTTP contract, determinism, limits, batching, and the captioner/model check.

The captioner is a tiny decoder trained in the test (conftest.train_tiny_captioner) on the tiny serve
model's embeddings of coloured squares, so a red square's greedy caption is "a red square".
"""

from __future__ import annotations

import asyncio
import io
import json
import sys

import httpx
import pytest
import torch
from PIL import Image

from clipforge.data.decode import decode_image

CAPTIONS = {"red": "a red square", "green": "a green square", "blue": "a blue square"}


fixtures = sys.modules["clipforge_index_test_fixtures"]  # the index tests' helpers, loaded by conftest.py


def _jpeg(name: str, seed: int = 7) -> bytes:
    return fixtures._jpeg(fixtures.COLORS[name], seed)


def _post(h: httpx.Client, img: bytes, **opts) -> httpx.Response:
    data = {k: str(v) for k, v in opts.items()}
    return h.post("/caption", data=data, files={"file": ("a.jpg", img, "image/jpeg")})


def test_greedy_captions_the_memorized_colours(caption_url):
    with httpx.Client(base_url=caption_url, timeout=30) as h:
        for name in ("red", "green", "blue"):
            r = _post(h, _jpeg(name), strategy="greedy")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["caption"] == CAPTIONS[name]
            assert body["captions"][0]["text"] == CAPTIONS[name]
            assert isinstance(body["captions"][0]["score"], float) and body["captions"][0]["score"] <= 0
            s = body["settings"]
            assert s["strategy"] == "greedy" and s["num_captions"] == 1 and s["max_length"] >= 4
            assert "beam_width" not in s and "seed" not in s  # only the settings that matter are reported
            assert body["took_ms"] >= body["caption_ms"] >= 0


def test_default_is_beam_and_settings_are_reported(caption_url):
    with httpx.Client(base_url=caption_url, timeout=30) as h:
        body = _post(h, _jpeg("blue")).json()
    assert body["caption"] == "a blue square"
    s = body["settings"]
    assert s["strategy"] == "beam" and s["beam_width"] == 3 and s["length_penalty"] == 1.0
    assert s["min_length"] == 3 and s["max_length"] == 15  # decoder max_len 16 - 1 < default 20
    assert s["describe"].startswith("beam w=3")


def test_greedy_and_beam_are_deterministic_and_batch_independent(
    make_caption_server, tiny_model_serve, tiny_captioner
):
    """The same image gives the same caption alone and inside a micro-batch with other requests."""
    imgs = [_jpeg(n, seed) for seed in (3, 4) for n in ("red", "green", "blue")]
    with make_caption_server(tiny_model_serve, tiny_captioner, max_wait_ms=300.0, max_batch=32) as url:
        with httpx.Client(base_url=url, timeout=30) as h:
            for strategy in ("greedy", "beam"):
                alone = [_post(h, im, strategy=strategy).json()["captions"] for im in imgs]
                again = [_post(h, im, strategy=strategy).json()["captions"] for im in imgs]
                assert alone == again

                async def together(strategy=strategy):
                    async with httpx.AsyncClient(base_url=url, timeout=30) as ah:
                        rs = await asyncio.gather(
                            *(
                                ah.post("/caption", data={"strategy": strategy}, files={"file": ("a", im)})
                                for im in imgs
                            )
                        )
                    return [r.json()["captions"] for r in rs]

                batched = asyncio.run(together())
                assert [[c["text"] for c in x] for x in batched] == [[c["text"] for c in x] for x in alone]
                for b, a in zip(batched, alone):
                    assert b[0]["score"] == pytest.approx(a[0]["score"], abs=1e-4)
            stats = h.get("/health").json()["stats"]["caption"]
    assert stats["max_batch_seen"] > 1  # the concurrent requests really shared model calls


def test_sampling_same_seed_same_captions(make_caption_server, tiny_model_serve, tiny_captioner):
    img = _jpeg("green")
    opts = {"strategy": "sample", "seed": 5, "num_captions": 4, "temperature": 3.0}
    with make_caption_server(tiny_model_serve, tiny_captioner, max_wait_ms=200.0) as url:
        with httpx.Client(base_url=url, timeout=30) as h:
            a = _post(h, img, **opts).json()
            b = _post(h, img, **opts).json()
            assert a["captions"] == b["captions"] and len(a["captions"]) == 4
            assert a["settings"]["seed"] == 5 and a["settings"]["temperature"] == 3.0
            others = [_post(h, img, **{**opts, "seed": s}).json()["captions"] for s in range(6, 12)]
            assert any(o != a["captions"] for o in others)  # the seed matters at temperature 3

            async def mixed():  # the same request batched with others (other seeds, other strategies)
                async with httpx.AsyncClient(base_url=url, timeout=30) as ah:
                    reqs = [{**opts, "seed": s} for s in (1, 2)] + [opts, {"strategy": "greedy"}]
                    rs = await asyncio.gather(
                        *(
                            ah.post(
                                "/caption", data={k: str(v) for k, v in o.items()}, files={"file": ("a", img)}
                            )
                            for o in reqs
                        )
                    )
                return [r.json() for r in rs]

            out = asyncio.run(mixed())
    assert out[2]["captions"] == a["captions"]
    assert out[3]["caption"] == "a green square"


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"strategy": "nucleus"}, "strategy must be one of greedy, beam, sample"),
        ({"beam_width": 9}, "beam_width must be in 1..8"),
        ({"beam_width": 0}, "beam_width must be in 1..8"),
        ({"max_length": 16}, "max_length must be in 1..15"),
        ({"max_length": 5, "min_length": 5}, "min_length must be in 0..4"),
        ({"temperature": 0}, r"temperature must be a number in \(0, 100\]"),
        ({"temperature": "nan"}, "temperature must be a number"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": "inf"}, "repetition_penalty"),
        ({"no_repeat_ngram": "2.5"}, "no_repeat_ngram must be an integer"),
        ({"seed": -1}, "seed must be in 0..4294967295"),
        ({"seed": "9" * 50}, "seed must be an integer"),
        ({"num_captions": 6, "strategy": "sample"}, "num_captions must be in 1..5"),
        ({"num_captions": 2}, "num_captions=2 needs strategy=sample"),
        ({"beams": 2}, "unknown field 'beams' \\(did you mean 'beam_width'\\?\\)"),
    ],
)
def test_options_out_of_bounds_are_400(caption_url, opts, match):
    import re

    with httpx.Client(base_url=caption_url, timeout=30) as h:
        r = _post(h, _jpeg("red"), **opts)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] in ("bad_option", "unknown_field") and re.search(match, body["detail"]), body


def test_server_limits_are_flags(make_caption_server, tiny_model_serve, tiny_captioner):
    cfg = {"max_caption_beams": 2, "max_caption_length": 6, "max_captions": 2}
    with make_caption_server(tiny_model_serve, tiny_captioner, **cfg) as url:
        with httpx.Client(base_url=url, timeout=30) as h:
            body = _post(h, _jpeg("red")).json()  # defaults fit the limits
            assert body["settings"]["beam_width"] == 2 and body["settings"]["max_length"] == 6
            assert _post(h, _jpeg("red"), beam_width=3).status_code == 400
            assert _post(h, _jpeg("red"), max_length=7).status_code == 400
            assert _post(h, _jpeg("red"), strategy="sample", num_captions=3).status_code == 400
            health = h.get("/health").json()["captioning"]
    assert health["enabled"] and health["limits"] == {"max_beams": 2, "max_length": 6, "max_captions": 2}
    assert health["mode"] == "paired" and health["condition"] == "embedding"


def test_json_body_with_options(caption_url):
    with httpx.Client(base_url=caption_url, timeout=30) as h:
        r = h.post("/caption", json={"strategy": "greedy"})
        assert r.status_code == 400 and r.json()["error"] == "missing_image"
        r = h.post("/caption", json={"url": "http://127.0.0.1/x.jpg", "beam_width": 99})
        assert r.status_code == 400 and r.json()["error"] == "bad_option"  # options checked first
        r = h.post("/caption", json={"url": "http://127.0.0.1/x.jpg", "strategy": "greedy"})
        assert r.status_code == 403 and r.json()["error"] == "urls_disabled"
        r = h.post("/caption", json={"url": "x", "beam_width": True})
        assert r.status_code == 400 and "beam_width" in r.json()["detail"]
        r = h.post("/caption", content=b"[1]", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "bad_json"


def test_image_urls_use_the_safe_fetch_path(make_caption_server, tiny_model_serve, tiny_captioner):
    with make_caption_server(
        tiny_model_serve, tiny_captioner, allow_image_urls=True, url_timeout_s=2.0
    ) as url:
        with httpx.Client(base_url=url, timeout=30) as h:
            for target in ("http://127.0.0.1:1/x.jpg", "http://169.254.169.254/latest"):
                r = h.post("/caption", json={"url": target, "strategy": "greedy"})
                assert r.status_code == 400 and r.json()["error"] == "fetch_failed", r.text
                r = h.post("/caption", data={"url": target}, files={"_": ("", b"")})
                assert r.status_code == 400 and r.json()["error"] == "fetch_failed", r.text


def test_image_checks_like_the_other_uploads(caption_url):
    big = io.BytesIO()
    Image.new("RGB", (1100, 1000)).save(big, format="PNG")  # 1.1 MP > the fixture's 1 MP limit
    with httpx.Client(base_url=caption_url, timeout=30) as h:
        assert _post(h, b"").json()["error"] == "empty_file"
        assert _post(h, b"not an image").json()["error"] == "bad_image"
        assert _post(h, big.getvalue()).json()["error"] == "image_too_large"
        r = h.post("/caption", data={"strategy": "greedy"}, files={"_": ("", b"")})
        assert r.status_code == 400 and r.json()["error"] == "missing_image"
        r = h.post("/caption", content=b"0" * 250_000, headers={"content-type": "image/png"})
        assert r.status_code in (413, 415)
        r = h.post("/caption", files={"file": ("a", b"0" * 250_000)})
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
        r = h.post("/caption", data={"seed": "1"}, files={"file": ("a", _jpeg("red")), "seed": ("s", b"1")})
        assert r.status_code == 400
        assert h.get("/health").status_code == 200


def test_without_captioner_caption_is_a_clear_404(client, server_url):
    with httpx.Client(base_url=server_url, timeout=30) as h:
        r = _post(h, _jpeg("red"))
        assert r.status_code == 404
        assert r.json()["error"] == "captioning_off" and "--captioner" in r.json()["detail"]
        assert h.get("/health").json()["captioning"]["enabled"] is False


def test_fingerprint_mismatch_is_refused(tiny_captioner, captioner_dir, tiny_clip_class, captioner_trainer):
    from clipforge.serve.service import ClipService, ServeConfig

    other = tiny_clip_class().eval()
    with torch.no_grad():
        other.img.weight.add_(0.01)  # same class, config and shapes; other weights
    with pytest.raises(ValueError, match="fingerprint .* its captions would be meaningless"):
        ClipService(other, None, ServeConfig(captioner=str(captioner_dir)))
    with pytest.raises(ValueError, match="fingerprint"):
        ClipService(other, None, captioner=tiny_captioner)
    with pytest.raises(ValueError, match="expects 32-d embeddings, the model gives 16-d"):
        narrow = tiny_clip_class(dim=16).eval()
        cap = captioner_trainer(tiny_clip_class().eval(), steps=0)
        cap.meta["encoder"]["fingerprint"] = __import__(
            "clipforge.caption.captioner", fromlist=["x"]
        ).encoder_fingerprint(narrow, "embedding")
        ClipService(narrow, None, captioner=cap)


def test_cli_captioner_flag(monkeypatch, tiny_model_serve, captioner_dir, tmp_path, tiny_clip_class):
    import clipforge.models
    from clipforge.cli import build_parser, main
    from clipforge.serve.cli import make_service

    monkeypatch.setattr(clipforge.models, "load_model", lambda spec, **kw: tiny_model_serve)
    args = build_parser().parse_args(
        [
            "serve",
            "tiny",
            "--captioner",
            str(captioner_dir),
            "--max-caption-beams",
            "4",
            "--max-captions",
            "2",
        ]
    )
    svc = make_service(args)
    assert svc.captioner is not None and svc.cfg.max_caption_beams == 4 and svc.cfg.max_captions == 2
    assert main(["serve", "tiny", "--captioner", str(tmp_path / "missing")]) == 2
    other = tiny_clip_class().eval()
    with torch.no_grad():
        other.words.weight.mul_(2)
    monkeypatch.setattr(clipforge.models, "load_model", lambda spec, **kw: other)
    assert main(["serve", "tiny", "--captioner", str(captioner_dir)]) == 2
    bad = tmp_path / "notcap"
    bad.mkdir()
    assert main(["serve", "tiny", "--captioner", str(bad)]) == 2


def test_one_bad_job_fails_alone(tiny_model_serve, tiny_captioner):
    """Inside one micro-batch a job that breaks the model call fails alone (batcher bisection)."""
    from clipforge.caption.decoding import DecodeOptions
    from clipforge.serve.batcher import call_isolated
    from clipforge.serve.captioning import CaptionEngine, CaptionJob, CaptionResult

    engine = CaptionEngine(tiny_captioner, tiny_model_serve, image_batch=4)
    good = tiny_model_serve.preprocess(decode_image(_jpeg("red")))
    opts = DecodeOptions(method="greedy")
    jobs = [CaptionJob(good, opts), CaptionJob(torch.zeros(2, 32, 32), opts), CaptionJob(good, opts)]
    out = call_isolated(engine, jobs)
    assert isinstance(out[1], Exception)
    assert isinstance(out[0], CaptionResult) and out[0].texts == ["a red square"] == out[2].texts


def test_openapi_documents_caption(caption_url):
    with httpx.Client(base_url=caption_url, timeout=30) as h:
        spec = h.get("/openapi.json").json()
    body = spec["paths"]["/caption"]["post"]["requestBody"]["content"]
    assert "beam_width" in body["multipart/form-data"]["schema"]["properties"]
    assert "url" in body["application/json"]["schema"]["properties"]
    assert "$ref" not in json.dumps(body)


def test_client_caption(caption_url):
    from clipforge.serve import Client, ClientError

    with Client(caption_url) as c:
        out = c.caption(_jpeg("red"), strategy="greedy")
        assert out["caption"] == "a red square" and out["settings"]["strategy"] == "greedy"
        with pytest.raises(ClientError) as e:
            c.caption(_jpeg("red"), beam_width=99)
        assert e.value.status == 400 and e.value.code == "bad_option"
        with pytest.raises(ValueError):
            c.caption()
