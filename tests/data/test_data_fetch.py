"""safe_fetch: SSRF guard (every hop), wall-clock deadline with dripping senders, size cap, uniform errors."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from clipforge.data.fetch import (
    PUBLIC_FETCH_ERROR,
    FetchConfig,
    Fetcher,
    FetchError,
    is_public_address,
    safe_fetch,
)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        try:
            self._serve()
        except OSError:
            pass

    def _serve(self) -> None:
        p = self.path
        if p == "/ok":
            body = b"x" * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif p.startswith("/drip"):  # Content-Length 60, one byte every 0.1 s: 6 s in all
            self.send_response(200)
            if p == "/drip":
                self.send_header("Content-Length", "60")
            self.end_headers()
            for _ in range(60):
                self.wfile.write(b"y")
                self.wfile.flush()
                time.sleep(0.1)
        elif p == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        elif p.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", p.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif p == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture()
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize(
    "addr, public",
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("not an ip", False),
    ],
)
def test_address_policy(addr: str, public: bool) -> None:
    assert is_public_address(addr) is public


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:{port}/ok", "http://localhost:{port}/ok", "http://[::1]:{port}/ok"]
)
def test_private_targets_refused_by_default(server: str, url: str) -> None:
    port = server.rsplit(":", 1)[1]
    with pytest.raises(FetchError) as e:
        safe_fetch(url.format(port=port), max_bytes=10_000, timeout_s=5)
    assert e.value.reason == "blocked_address"
    assert safe_fetch(f"{server}/ok", max_bytes=10_000, timeout_s=5, allow_private=True).data == b"x" * 1000


def test_redirect_hops_are_rechecked(server: str, monkeypatch) -> None:
    """A public first hop redirecting to loopback is refused at the second hop (issue 11.5)."""
    import clipforge.data.fetch as f

    real = f.is_public_address
    monkeypatch.setattr(f, "is_public_address", lambda a: a == "127.0.0.1" or real(a))
    port = server.rsplit(":", 1)[1]
    target = f"http://[::1]:{port}/ok"  # ::1 stays non-public
    with pytest.raises(FetchError) as e:
        safe_fetch(f"{server}/redirect?to={target}", max_bytes=10_000, timeout_s=5)
    assert e.value.reason == "blocked_address"
    with pytest.raises(FetchError) as e:
        safe_fetch(f"{server}/loop", max_bytes=10_000, timeout_s=5, allow_private=True)
    assert e.value.reason == "too_many_redirects"


@pytest.mark.parametrize("path", ["/drip", "/drip-chunked"])
def test_total_deadline_with_dripping_sender(server: str, path: str) -> None:
    """Content-Length + 1 byte per 0.1 s used to run for the whole body, ignoring the total timeout (11.6)."""
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        safe_fetch(f"{server}{path}", max_bytes=10_000, timeout_s=1.0, read_timeout=5, allow_private=True)
    assert e.value.reason == "timeout" and time.monotonic() - t0 < 2.5


def test_ingest_fetcher_total_timeout_with_content_length(server: str) -> None:
    fetcher = Fetcher(FetchConfig(timeout=5, total_timeout=1.0, retries=0, allow_private=True))
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetcher.fetch(f"{server}/drip")
    assert e.value.reason == "timeout" and time.monotonic() - t0 < 2.5


def test_size_cap_and_uniform_public_errors(server: str) -> None:
    with pytest.raises(FetchError) as e:
        safe_fetch(f"{server}/big", max_bytes=10_000, timeout_s=5, allow_private=True)
    assert e.value.reason == "too_large"
    # a closed port, a 404 and a non-answering port all tell a client the same thing
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)  # accepts, never answers
    try:
        publics = set()
        for url in (
            f"http://127.0.0.1:{closed}/x",
            f"{server}/missing",
            f"http://127.0.0.1:{listening.getsockname()[1]}/x",
        ):
            with pytest.raises(FetchError) as e:
                safe_fetch(url, max_bytes=10_000, timeout_s=0.5, allow_private=True)
            publics.add(e.value.public)
        assert publics == {PUBLIC_FETCH_ERROR}
    finally:
        listening.close()


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://x/y", "http://user:pw@example.com/", "http://x\n/"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(FetchError) as e:
        safe_fetch(url, max_bytes=10, timeout_s=1)
    assert e.value.reason == "bad_url"
