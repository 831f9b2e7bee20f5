"""Issue 11 #5: with --allow-image-urls the server fetches only public hosts (unless
--allow-private-urls), under a wall-clock deadline, with one error text whatever the target did."""

from __future__ import annotations

import asyncio
import http.server
import io
import socket
import threading
import time
from functools import partial

import httpx
import pytest
from PIL import Image

from clipforge.serve import Client, ClientError


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def file_server(tmp_path):
    """http://127.0.0.1:PORT/q.jpg served from tmp_path."""
    (tmp_path / "q.jpg").write_bytes(_jpeg())
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


def test_internal_addresses_are_refused_by_default(server_factory, tiny_model_serve, file_server):
    internal = [
        f"{file_server}/q.jpg",  # open port, a real image
        f"http://127.0.0.1:{_closed_port()}/q.jpg",  # closed port
        "http://localhost:1/x.jpg",
        "http://[::1]:80/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/x.jpg",
        "http://0.0.0.0:8000/x.jpg",
    ]
    with server_factory(tiny_model_serve, None, allow_image_urls=True) as url, Client(url) as c:
        details = set()
        for u in internal:
            t = time.perf_counter()
            with pytest.raises(ClientError) as ei:
                c.embed_image(url=u)
            assert (ei.value.status, ei.value.code) == (400, "fetch_failed"), (u, ei.value.detail)
            assert time.perf_counter() - t < 3.0, u
            details.add(ei.value.detail)
        assert len(details) == 1, details  # open or closed, the client learns the same thing
        assert c.health()["status"] == "ok"


def test_error_text_is_uniform_when_private_hosts_are_allowed(server_factory, tiny_model_serve, file_server):
    cfg = {"allow_image_urls": True, "allow_private_urls": True, "url_timeout_s": 3.0}
    with server_factory(tiny_model_serve, None, **cfg) as url, Client(url) as c:
        assert len(c.embed_image(url=f"{file_server}/q.jpg")) == 32  # explicitly allowed: fetched
        details = set()
        for u in (f"{file_server}/missing.jpg", f"http://127.0.0.1:{_closed_port()}/q.jpg"):
            with pytest.raises(ClientError) as ei:
                c.embed_image(url=u)
            assert (ei.value.status, ei.value.code) == (400, "fetch_failed")
            details.add(ei.value.detail)
        assert len(details) == 1, details  # a 404 and a closed port look the same


@pytest.fixture
def drip_server():
    """Answers 200 with Content-Length 100000, then one byte every 0.2 s: a slow-loris image host."""
    stop = threading.Event()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(32)
    srv.settimeout(0.2)

    def drip(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
                while not stop.is_set():
                    conn.sendall(b"\xff")
                    time.sleep(0.2)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}/slow.jpg"
    stop.set()
    srv.close()


def test_slow_sender_is_cut_at_the_deadline(server_factory, tiny_model_serve, drip_server, sample_jpeg):
    """6 dripping URLs (more than the 4 fetch threads) + an upload: the upload is not delayed, and
    every URL request is answered within the deadline (+1 s for one that could not start)."""
    deadline = 3.0
    cfg = {"allow_image_urls": True, "allow_private_urls": True, "url_timeout_s": deadline}

    async def go(url: str) -> tuple[list[tuple[int, float]], float]:
        async with httpx.AsyncClient(base_url=url, timeout=20) as h:

            async def timed(coro):
                t = time.perf_counter()
                r = await coro
                return r.status_code, time.perf_counter() - t

            slow = [timed(h.post("/embed/image", json={"url": drip_server})) for _ in range(6)]
            tasks = [asyncio.ensure_future(s) for s in slow]
            await asyncio.sleep(0.3)
            code, upload_s = await timed(h.post("/embed/image", files={"file": ("a.jpg", sample_jpeg)}))
            assert code == 200
            return list(await asyncio.gather(*tasks)), upload_s

    with server_factory(tiny_model_serve, None, **cfg) as url:
        results, upload_s = asyncio.run(go(url))
        assert upload_s < deadline - 0.5, upload_s  # decoding never waits on the network
        assert all(code == 400 for code, _ in results), results
        assert max(s for _, s in results) < deadline + 1.0 + 2.0, results  # deadline, +1 s queue, slack
        assert httpx.get(url + "/health").json()["status"] == "ok"
