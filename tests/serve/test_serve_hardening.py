"""Issue 11 regressions in the server, one test per numbered case (each fails on the code before it).

3: /classify templates are parsed, never ``str.format``ed as given; 7: one bad request in a micro-batch
fails alone, and filter values no column could hold are a 400; 13: a chunked body over the limit is a
413 on every endpoint, and /health shows no server paths without the API key.
"""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import pytest
from PIL import Image

from clipforge.serve import Client, ClientError


def _png(w: int = 40, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


IMG = _png()

# the six malformed templates, the 16-byte padding bomb, and attribute access (200 before)
BAD_TEMPLATES = [
    "{}{0}",
    "{{}}{x}",
    "{{}}{0[99]}",
    "{} {:d}",
    "{{}}{!z}",
    "{!r}",
    "{{}}{:>20000000}",
    "{{}}{0.__class__.__mro__}",
    "{:{}}",
    "a { } b",
    "unbalanced {",
]


# -- 3: templates -----------------------------------------------------------------------------------
@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_malformed_templates_are_a_fast_400(client, template):
    t = time.perf_counter()
    with pytest.raises(ClientError) as ei:
        client.classify(IMG, labels=["cat", "dog"], templates=[template])
    assert (ei.value.status, ei.value.code) == (400, "bad_templates"), ei.value.detail
    assert "exactly one bare" in ei.value.detail or "Single" in ei.value.detail
    assert time.perf_counter() - t < 2.0
    assert client.health()["status"] == "ok"


def test_escaped_braces_are_allowed_and_rendered_literally(client):
    from clipforge.serve.labels import fill_template

    assert fill_template("{{{}}} and {{}}", "cat") == "{cat} and {}"
    out = client.classify(IMG, labels=["cat", "dog"], templates=["{{{}}}", "a photo of a {}."])
    assert out["num_labels"] == 2


def test_template_length_and_prompt_count_are_capped(server_factory, tiny_model_serve):
    with (
        server_factory(tiny_model_serve, None, max_prompts=20, max_template_chars=50) as url,
        Client(url) as c,
    ):
        with pytest.raises(ClientError) as ei:
            c.classify(IMG, labels=["a", "b"], templates=["{}" + "x" * 60])
        assert (ei.value.status, ei.value.code) == (400, "bad_templates") and "50" in ei.value.detail
        with pytest.raises(ClientError) as ei:  # 10 labels x 4 default templates = 40 prompts > 20
            c.classify(IMG, labels=[f"l{i}" for i in range(10)])
        assert (ei.value.status, ei.value.code) == (400, "too_many_prompts")
        assert c.classify(IMG, labels=[f"l{i}" for i in range(5)])["num_labels"] == 5  # 20: allowed


# -- 7: micro-batch isolation, filter values ---------------------------------------------------------
def test_a_bad_search_fails_alone_in_its_batch(tiny_model_serve, tiny_index_dir):
    """Straight to the service (no HTTP validation): an overflowing filter value in a batch of 25."""
    from clipforge.index import ClipIndex
    from clipforge.serve.service import ClipService, ServeConfig

    async def go():
        svc = ClipService(tiny_model_serve, ClipIndex.load(tiny_index_dir), ServeConfig(max_wait_ms=50))
        calls = [svc.search(text=f"square {i}", k=3) for i in range(12)]
        calls.append(svc.search(text="x", k=3, filters={"label": 10**30}))
        calls += [svc.search(text=f"green {i}", k=3, filters={"classname": "green"}) for i in range(12)]
        out = await asyncio.gather(*calls, return_exceptions=True)
        batches = svc.search_batcher.stats.batches
        await svc.close()
        return out, batches

    out, batches = asyncio.run(go())
    assert batches < 25  # they really shared batches
    assert isinstance(out[12], Exception)
    good = out[:12] + out[13:]
    assert all(isinstance(h, list) and len(h) == 3 for h in good), [type(h) for h in good]


def test_filter_values_no_column_can_hold_are_400(client, server_url):
    for filters in ({"label": 10**30}, {"label": [1, -(2**64)]}, {"label": [[1]]}, {"label": {"a": 1}}):
        with pytest.raises(ClientError) as ei:
            client.search("dog", filters=filters)
        assert (ei.value.status, ei.value.code) == (400, "bad_filters"), filters
    r = httpx.post(
        server_url + "/search",
        content=b'{"text": "dog", "filters": {"label": Infinity}}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_filters"
    r = httpx.post(
        server_url + "/search", data={"text": "dog", "filters": '{"label": 1e999}'}, files={"_": ("", b"")}
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_filters"
    assert len(client.search("dog", k=3, filters={"label": [0, 1]})["results"]) == 3


def test_concurrent_bad_filter_does_not_fail_innocent_searches(server_url):
    async def go() -> list[int]:
        async with httpx.AsyncClient(base_url=server_url) as h:
            reqs = [h.post("/search", json={"text": f"square {i}", "k": 3}) for i in range(30)]
            reqs.insert(15, h.post("/search", json={"text": "x", "filters": {"label": 10**30}}))
            return [r.status_code for r in await asyncio.gather(*reqs)]

    codes = asyncio.run(go())
    assert codes[15] == 400 and codes[:15] + codes[16:] == [200] * 30


# -- 13: chunked bodies, /health -----------------------------------------------------------------------
def _chunked(total: int, head: bytes = b'{"texts": ["', chunk: int = 1 << 20):
    yield head
    sent = 0
    while sent < total:
        yield b"a" * chunk
        sent += chunk
    yield b'"]}'


def test_12mb_chunked_body_is_413_on_every_endpoint(server_factory, tiny_model_serve, tiny_index_dir):
    with server_factory(tiny_model_serve, tiny_index_dir) as url, httpx.Client(base_url=url) as h:  # 10 MiB
        part = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        for path, ctype, head in [
            ("/embed/text", "application/json", b'{"texts": ["'),
            ("/search", "application/json", b'{"text": "'),
            ("/embed/image", "application/json", b'{"url": "'),
            ("/classify", "multipart/form-data; boundary=x", part),
            ("/embed/image", "multipart/form-data; boundary=x", part),
        ]:
            r = h.post(path, content=_chunked(12 << 20, head), headers={"content-type": ctype})
            assert r.status_code == 413 and r.json()["error"] == "payload_too_large", (path, r.text[:200])
        assert h.post("/embed/text", json={"texts": ["ok"]}).status_code == 200


def test_health_shows_no_server_paths_without_the_key(server_factory, tiny_model_serve, tiny_index_dir):
    where = str(tiny_index_dir)
    with server_factory(tiny_model_serve, tiny_index_dir, api_key="s3cret") as url:
        public = httpx.get(url + "/health")
        assert public.status_code == 200 and where not in public.text and "/tmp" not in public.text
        assert public.json()["index"]["count"] == 48 and public.json()["api_key_required"] is True
        full = httpx.get(url + "/health", headers={"X-API-Key": "s3cret"}).json()
        assert full["index"]["path"] == where
        wrong = httpx.get(url + "/health", headers={"X-API-Key": "nope"})
        assert where not in wrong.text
    with server_factory(tiny_model_serve, tiny_index_dir) as url:  # no key configured: nobody has it
        assert where not in httpx.get(url + "/health").text


def test_strip_paths():
    from clipforge.serve.health import strip_paths

    assert strip_paths("/srv/models/minilm") == "minilm"
    assert strip_paths("towers:effnet+hf:/home/u/m/") == "towers:effnet+hf:m"
    assert (
        strip_paths("hf:sentence-transformers/all-MiniLM-L6-v2")
        == "hf:sentence-transformers/all-MiniLM-L6-v2"
    )
    assert strip_paths("test:tiny") == "test:tiny"
