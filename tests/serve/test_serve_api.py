"""HTTP API through clipforge.serve.Client against a live uvicorn server (tiny model, tiny index)."""

from __future__ import annotations

import io
import json
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from clipforge.serve import Client, ClientError


def test_health_and_docs(client, server_url):
    h = client.health()
    assert h["status"] == "ok" and h["model"] == "test:tiny" and h["index"]["count"] == 48
    assert h["model_matches_index"] is True
    assert "cifar10" in client.label_sets()
    assert httpx.get(server_url + "/openapi.json").json()["paths"].keys() >= {
        "/search",
        "/classify",
        "/embed/text",
        "/embed/image",
        "/health",
    }
    page = httpx.get(server_url + "/")
    assert page.status_code == 200 and "<title>clipforge</title>" in page.text


def test_embed_text_matches_model(client, tiny_model_serve):
    from clipforge.models.encode import embed_texts

    emb = np.array(client.embed_text(["a red square", "a blue square"]))
    want = embed_texts(tiny_model_serve, ["a red square", "a blue square"])
    assert emb.shape == (2, 32)
    np.testing.assert_allclose(emb, want, atol=1e-5)


def test_embed_image_and_image_search_find_itself(client, sample_jpeg):
    emb = np.array(client.embed_image(sample_jpeg))
    assert emb.shape == (32,) and abs(np.linalg.norm(emb) - 1) < 1e-4
    res = client.search(image=sample_jpeg, k=3)
    assert res["query"]["kind"] == "image"
    top = res["results"][0]
    assert top["key"] == "b0024" and top["score"] > 0.99
    assert "source" not in top and top["image_url"] == "/images/b0024"


def test_text_search_and_thumbnails(client):
    res = client.search("a red square", k=5)
    rs = res["results"]
    assert len(rs) == 5 and [r["rank"] for r in rs] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(rs, rs[1:]))
    jpg = client.image(rs[0]["uid"])
    im = Image.open(io.BytesIO(jpg))
    assert im.format == "JPEG" and max(im.size) <= 160
    # filters: only green ones, and the exact count of the filtered subset
    greens = client.search("anything", k=100, filters={"classname": "green"})["results"]
    assert len(greens) == 16 and {r["classname"] for r in greens} == {"green"}


def test_classify_custom_and_named(client, sample_jpeg):
    out = client.classify(sample_jpeg, labels=["red square", "green square", "blue square"])
    probs = [p["prob"] for p in out["predictions"]]
    assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-5 and probs == sorted(probs, reverse=True)
    named = client.classify(sample_jpeg, label_set="cifar10", top_k=4)
    assert named["num_labels"] == 10 and len(named["predictions"]) == 4 and named["label_source"] == "cifar10"
    # cached label embeddings give identical answers
    again = client.classify(sample_jpeg, label_set="cifar10", top_k=4)
    assert again["predictions"] == named["predictions"]


@pytest.mark.parametrize(
    "call, status, code",
    [
        (lambda c: c.search("", k=5), 400, "empty_text"),
        (lambda c: c.search("dog", k=0), 400, "bad_k"),
        (lambda c: c.search("dog", k=101), 400, "bad_k"),
        (lambda c: c.search(k=5), 400, "empty_query"),
        (lambda c: c.search("dog", filters={"nocol": 1}), 400, "bad_filters"),
        (lambda c: c.search("dog", filters={"label": {"a": 1}}), 400, "bad_filters"),
        (lambda c: c.embed_text([]), 400, "empty_text"),
        (lambda c: c.embed_text(["ok", "  "]), 400, "empty_text"),
        (lambda c: c.embed_text(["x"] * 65), 400, "too_many_texts"),
        (lambda c: c.embed_text("x" * 1001), 400, "text_too_long"),
        (lambda c: c.embed_image(b"this is not an image"), 400, "bad_image"),
        (lambda c: c.embed_image(url="http://127.0.0.1:1/x.jpg"), 403, "urls_disabled"),
        (lambda c: c.classify(b"GIF89a nonsense", labels=["a", "b"]), 400, "bad_image"),
        (lambda c: c.classify(IMG, label_set="nope"), 400, "unknown_label_set"),
        (lambda c: c.classify(IMG), 400, "missing_labels"),
        (lambda c: c.classify(IMG, labels=["only"]), 400, "bad_labels"),
        (lambda c: c.classify(IMG, labels=["a", "b"], templates=["no placeholder"]), 400, "bad_templates"),
        (lambda c: c.classify(labels=["a", "b"]), 400, "missing_image"),
        (lambda c: c.image("bad key;rm -rf"), 400, "bad_key"),
        (lambda c: c.image("x" * 300), 400, "bad_key"),
        (lambda c: c.image("nokey"), 404, "not_found"),
    ],
)
def test_bad_input_is_4xx_json(client, call, status, code):
    with pytest.raises(ClientError) as ei:
        call(client)
    assert (ei.value.status, ei.value.code) == (status, code), ei.value.detail
    assert client.health()["status"] == "ok"  # and the server is still up


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()


IMG = _png(40, 40)


def test_limits_raw_http(server_url):
    with httpx.Client(base_url=server_url) as h:
        r = h.post("/search", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"] == "bad_json"
        r = h.post("/search", json={"text": "dog", "k": "many"})
        assert r.status_code == 422 and r.json()["error"] == "invalid_request"
        r = h.post("/embed/text", json={"texts": "not a list"})
        assert r.status_code == 422
        r = h.post("/classify", content=b"x", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        # body over max_upload_bytes (200 kB in this fixture) -> 413 before reading it
        r = h.post("/embed/image", files={"file": ("big.bin", b"0" * 300_000)})
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
        # a chunked body with no Content-Length is cut off while streaming
        head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        chunks = [head] + [b"0" * 50_000] * 6 + [b"\r\n--xyz--\r\n"]
        r = h.post(
            "/embed/image",
            content=iter(chunks),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
        # image whose header declares more pixels than allowed (1 MP here): refused before decoding
        r = h.post("/embed/image", files={"file": ("big.png", _png(1200, 1000))})
        assert r.status_code == 400 and r.json()["error"] == "image_too_large"
        # path traversal: httpx would normalize "../" away, so send it percent-encoded
        for raw in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/a%2F..%2F..%2Fx", "/images/%2Fetc%2Fpasswd"):
            r = h.send(h.build_request("GET", httpx.URL(server_url + raw)))
            assert r.status_code == 400 and r.json()["error"] == "bad_key", raw
        r = h.get("/nope")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        assert h.get("/health").status_code == 200


def test_concurrent_requests_are_batched(server_url):
    import asyncio

    async def go() -> list[int]:
        async with httpx.AsyncClient(base_url=server_url) as h:
            rs = await asyncio.gather(
                *(h.post("/search", json={"text": f"square {i}", "k": 3}) for i in range(40))
            )
            return [r.status_code for r in rs]

    before = httpx.get(server_url + "/health").json()["stats"]["search"]
    assert asyncio.run(go()) == [200] * 40
    after = httpx.get(server_url + "/health").json()["stats"]["search"]
    items, batches = after["items"] - before["items"], after["batches"] - before["batches"]
    assert items == 40 and batches < 40  # several requests shared a model call


def test_api_key_and_cors(server_factory, tiny_model_serve, tiny_index_dir):
    with server_factory(
        tiny_model_serve, tiny_index_dir, api_key="s3cret", cors_origins=["http://app.example"]
    ) as url:
        assert httpx.get(url + "/health").status_code == 200  # open
        r = httpx.post(url + "/search", json={"text": "dog"})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        with Client(url, api_key="wrong") as c, pytest.raises(ClientError) as ei:
            c.search("dog")
        assert ei.value.status == 401
        with Client(url, api_key="s3cret") as c:
            uid = c.search("dog", k=1)["results"][0]["uid"]
            assert c.image(uid)[:2] == b"\xff\xd8"
        assert httpx.get(f"{url}/images/{uid}?api_key=s3cret").status_code == 200
        pre = httpx.options(
            url + "/search",
            headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert pre.headers.get("access-control-allow-origin") == "http://app.example"
        pre = httpx.options(
            url + "/search",
            headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert pre.headers.get("access-control-allow-origin") is None


def test_image_urls_when_allowed(server_factory, tiny_model_serve, tiny_index_dir, sample_jpeg, tmp_path):
    import http.server
    import threading
    from functools import partial

    (tmp_path / "q.jpg").write_bytes(sample_jpeg)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    img_url = f"http://127.0.0.1:{httpd.server_address[1]}/q.jpg"
    try:
        with (
            server_factory(
                tiny_model_serve, tiny_index_dir, allow_image_urls=True, allow_private_urls=True
            ) as url,
            Client(url) as c,
        ):
            assert c.search(image_url=img_url, k=1)["results"][0]["key"] == "b0024"
            assert len(c.embed_image(url=img_url)) == 32
            assert c.classify(url=img_url, labels=["x", "y"])["num_labels"] == 2
            with pytest.raises(ClientError) as ei:
                c.embed_image(url=img_url.replace("q.jpg", "missing.jpg"))
            assert ei.value.status == 400 and ei.value.code == "fetch_failed"
    finally:
        httpd.shutdown()


def test_server_without_index(server_factory, tiny_model_serve):
    with server_factory(tiny_model_serve, None) as url, Client(url) as c:
        assert c.health()["index"] is None
        with pytest.raises(ClientError) as ei:
            c.search("dog")
        assert (ei.value.status, ei.value.code) == (404, "no_index")
        assert len(c.embed_text("dog")[0]) == 32


def test_openapi_json_is_valid(server_url):
    spec = httpx.get(server_url + "/openapi.json").json()
    text = json.dumps(spec)
    assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text):  # no dangling reference
        assert ref in spec["components"]["schemas"], ref
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"text", "image_url", "k", "filters"}


def test_other_weights_are_flagged(server_factory, tiny_index_dir):
    import torch

    from clipforge.serve import Client

    other = __import__("clipforge_index_test_fixtures").TinyClip().eval()
    with torch.no_grad():
        other.img.bias.add_(0.5)  # same config, different weights: the index's vectors don't fit
    with server_factory(other, tiny_index_dir) as url, Client(url) as c:
        assert c.health()["model_matches_index"] is False
