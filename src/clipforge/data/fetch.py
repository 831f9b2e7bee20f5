"""Bounded, SSRF-safe downloading: :func:`safe_fetch` for one URL, :class:`Fetcher` for ingest.

:func:`safe_fetch` is the one way clipforge fetches a URL named by data or by a remote client (URL
ingest, the server's ``--allow-image-urls``, index queries by URL):

- only ``http``/``https``; the host is resolved once and every address is checked: loopback,
  link-local, private, shared (CGNAT), multicast, reserved and unspecified addresses (IPv4 and IPv6,
  including IPv4-mapped/6to4/Teredo/NAT64 embeddings) are refused unless ``allow_private=True``; the
  connection goes to the checked address (no second lookup an attacker's DNS could change);
- redirects are followed by hand (at most ``max_redirects``), each hop checked the same way;
- ``timeout_s`` is a wall-clock deadline for the WHOLE fetch (DNS, connect, TLS, headers, every
  redirect, body): a watchdog shuts the socket at the deadline, so a server that drips bytes (with or
  without Content-Length) cannot hold a thread longer;
- ``max_bytes`` caps the body (a larger Content-Length is refused before reading); bodies are asked for
  with ``Accept-Encoding: identity`` and never decompressed;
- errors are :class:`FetchError` with a machine ``reason`` (for reports and retry) and a ``public``
  text that is the same for refused, closed, filtered, timed-out and failing targets, so a remote client
  cannot use it to map ports. Environment proxies are not used.

:class:`Fetcher` adds ingest's politeness on top: retries with exponential backoff, per-host limits and
``X-Robots-Tag`` opt-outs honoured the way img2dataset does (``noai``, ``noimageai``, ``noindex``,
``noimageindex``, optionally scoped to a user agent token: skipped as ``robots_optout``, never retried).
Each host gets at most ``per_host`` requests in flight and a minimum ``host_delay`` between request starts.
Failures raise :class:`~clipforge.data.decode.SkipSample` with a reason; :func:`is_retryable` tells
which ones are worth a second run (timeouts, connection errors, HTTP 408/425/429/5xx).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from requests.utils import requote_uri

from clipforge.data.skip import SkipSample

RETRYABLE_REASONS = {"timeout", "connection_error", "http_408", "http_425", "http_429"}
PUBLIC_FETCH_ERROR = "could not fetch the URL"  # one text for every network-level failure
REDIRECT_CODES = (301, 302, 303, 307, 308)
DEFAULT_OPTOUT = ("noai", "noimageai", "noindex", "noimageindex")


def is_retryable(reason: str) -> bool:
    return reason in RETRYABLE_REASONS or (reason.startswith("http_5") and len(reason) == 8)


class FetchError(SkipSample):
    """A failed fetch: ``reason`` for reports/retry, ``public`` for a remote client (uniform text)."""

    def __init__(self, reason: str, detail: str = "", public: str = PUBLIC_FETCH_ERROR):
        super().__init__(reason, detail)
        self.public = public


@dataclass
class FetchResult:
    data: bytes
    url: str  # final URL after redirects
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)  # lower-case name -> values


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(addr: str) -> bool:
    """True only for a globally routable unicast address (IPv4 or IPv6, embedded IPv4 checked too)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = _embedded_v4(ip)
        if v4 is not None and not is_public_address(str(v4)):
            return False
    return not (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def _resolve(host: str, port: int, timeout: float) -> list[str]:
    """getaddrinfo with a deadline (it has none of its own): run in a daemon thread."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["r"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            box["e"] = e

    t = threading.Thread(target=run, daemon=True, name="clipforge-dns")
    t.start()
    t.join(max(0.0, timeout))
    if t.is_alive():
        raise FetchError("timeout", f"DNS lookup of {host} took too long")
    if "e" in box:
        raise FetchError("connection_error", f"DNS lookup of {host} failed: {box['e']}")
    addrs = [info[4][0] for info in box["r"]]  # type: ignore[union-attr]
    return list(dict.fromkeys(addrs))


def _target(url: str) -> tuple[str, str, int, str]:
    """URL -> (scheme, ascii host, port, path?query); FetchError(bad_url) for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchError("bad_url", f"{e}", public="invalid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("bad_url", f"scheme {scheme!r} is not http/https", public="invalid URL")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise FetchError("bad_url", "no host, or credentials in the URL", public="invalid URL")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise FetchError("bad_url", "host name is not valid IDNA", public="invalid URL") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise FetchError("bad_url", "control characters in the URL", public="invalid URL")
    path = requote_uri((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))  # as requests does
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _tls_context() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi ships with requests
        return ssl.create_default_context()


def _connect(
    host: str, port: int, allow_private: bool, deadline: float, read_timeout: float
) -> socket.socket:
    """TCP connection to the first reachable checked address of ``host``."""
    addrs = _resolve(host, port, deadline - time.monotonic())
    if not allow_private:
        blocked = [a for a in addrs if not is_public_address(a)]
        if blocked or not addrs:
            raise FetchError(
                "blocked_address",
                f"{host} resolves to a non-public address ({', '.join(blocked[:3])})",
                public="URL host is not allowed (non-public address)",
            )
    last: Exception | None = None
    for addr in addrs:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return socket.create_connection((addr, port), timeout=min(read_timeout, left))
        except OSError as e:
            last = e
    if last is None or isinstance(last, (TimeoutError, socket.timeout)):
        raise FetchError("timeout", f"connect to {host}:{port} timed out")
    raise FetchError("connection_error", f"{type(last).__name__}: {str(last)[:200]}")


def _headers(resp: http.client.HTTPResponse) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in resp.getheaders():
        out.setdefault(k.lower(), []).append(v)
    return out


def _one_hop(
    url: str, max_bytes: int, allow_private: bool, deadline: float, read_timeout: float, user_agent: str
) -> FetchResult:
    scheme, host, port, path = _target(url)
    raw = sock = _connect(host, port, allow_private, deadline, read_timeout)
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _shutdown, (raw,))
    timer.daemon = True
    timer.start()  # the wall-clock bound for TLS, headers and body, however slowly bytes arrive
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    conn = cls(host, port, timeout=read_timeout)
    try:
        if scheme == "https":
            raw.settimeout(min(read_timeout, max(0.01, deadline - time.monotonic())))
            sock = _tls_context().wrap_socket(raw, server_hostname=host)
        conn.sock = sock  # already connected to the checked address
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for k, v in (
            ("User-Agent", user_agent),
            ("Accept", "image/*,*/*;q=0.8"),
            ("Accept-Encoding", "identity"),
            ("Connection", "close"),
        ):
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        headers = _headers(resp)
        if resp.status in REDIRECT_CODES or resp.status != 200:
            return FetchResult(b"", url, resp.status, headers)
        length = resp.getheader("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > max_bytes:
            raise FetchError("too_large", f"Content-Length {length} > {max_bytes} bytes")
        chunks, size = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FetchError("timeout", "download exceeded its total time limit")
            sock.settimeout(min(read_timeout, left))
            chunk = resp.read1(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise FetchError("too_large", f"> {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise FetchError("timeout", "download exceeded its total time limit")
        return FetchResult(b"".join(chunks), url, resp.status, headers)
    except FetchError:
        raise
    except TimeoutError:
        raise FetchError("timeout", "read timed out") from None
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as e:
        if time.monotonic() >= deadline:  # the watchdog shut the socket
            raise FetchError("timeout", "download exceeded its total time limit") from None
        raise FetchError("connection_error", f"{type(e).__name__}: {str(e)[:200]}") from None
    finally:
        timer.cancel()
        conn.close()
        sock.close()
        raw.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def safe_fetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allow_private: bool = False,
    max_redirects: int = 5,
    read_timeout: float | None = None,
    user_agent: str = "clipforge/0.1",
) -> FetchResult:
    """GET ``url`` under the rules in the module docstring; returns the 200 response or raises FetchError.

    ``timeout_s``: wall-clock limit for everything; ``read_timeout``: also fail when no byte arrives
    for this long (default ``timeout_s``). Non-200 answers raise FetchError(``http_<code>``).
    """
    deadline = time.monotonic() + timeout_s
    read_timeout = min(read_timeout or timeout_s, timeout_s)
    for _ in range(max_redirects + 1):
        res = _one_hop(url, max_bytes, allow_private, deadline, read_timeout, user_agent)
        if res.status in REDIRECT_CODES and res.headers.get("location"):
            url = urljoin(url, res.headers["location"][0].strip())
            continue
        if res.status != 200:
            raise FetchError(f"http_{res.status}", url[:200])
        return res
    raise FetchError("too_many_redirects", f"more than {max_redirects} redirects", public=PUBLIC_FETCH_ERROR)


@dataclass
class FetchConfig:
    """Download policy. Defaults suit a few thousand URLs from many hosts."""

    timeout: float = 10.0  # connect and per-read timeout (s)
    total_timeout: float = 60.0  # whole download, so a slow-drip server cannot stall a worker forever
    retries: int = 2  # extra attempts for retryable failures
    backoff: float = 0.5  # first retry waits this long, then doubles
    per_host: int = 4  # max concurrent requests per host
    host_delay: float = 0.0  # min seconds between request starts to the same host
    max_bytes: int = 50 * 1024 * 1024
    user_agent: str = "clipforge/0.1 (image-text dataset ingest; +https://github.com/clipforge)"
    user_agent_token: str = "clipforge"  # for X-Robots-Tag "token: directive" scoping
    optout_directives: tuple[str, ...] = DEFAULT_OPTOUT
    allow_private: bool = False  # fetch loopback/private/link-local addresses (only for trusted tables)
    max_redirects: int = 5


class _HostGate:
    """Per-host concurrency limit and minimum spacing between request starts."""

    def __init__(self, per_host: int, delay: float) -> None:
        self.per_host, self.delay = per_host, delay
        self._lock = threading.Lock()
        self._sems: dict[str, threading.BoundedSemaphore] = {}
        self._next_start: dict[str, float] = {}

    def __call__(self, host: str) -> _HostSlot:
        with self._lock:
            sem = self._sems.setdefault(host, threading.BoundedSemaphore(self.per_host))
        return _HostSlot(self, host, sem)

    def wait_turn(self, host: str) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start.get(host, 0.0))
            self._next_start[host] = start + self.delay
        if start > now:
            time.sleep(start - now)


class _HostSlot:
    def __init__(self, gate: _HostGate, host: str, sem: threading.BoundedSemaphore) -> None:
        self.gate, self.host, self.sem = gate, host, sem

    def __enter__(self) -> None:
        self.sem.acquire()
        self.gate.wait_turn(self.host)

    def __exit__(self, *exc) -> None:
        self.sem.release()


def robots_optout(header_values: list[str], token: str, directives: tuple[str, ...]) -> bool:
    """img2dataset's rule: ``X-Robots-Tag: [token:] d1, d2`` disallows if a directive matches and the
    value is unscoped or scoped to our token."""
    for value in header_values:
        scoped = value.split(":", 1)
        names = [d.strip().lower() for d in scoped[-1].split(",")]
        ua = scoped[0].strip().lower() if len(scoped) == 2 else None
        if (ua is None or ua == token.lower()) and any(d in directives for d in names):
            return True
    return False


class Fetcher:
    """Thread-safe downloader for ingest: :func:`safe_fetch` plus retries, per-host limits, opt-outs."""

    def __init__(self, cfg: FetchConfig | None = None, pool_size: int = 32) -> None:
        self.cfg = cfg or FetchConfig()
        self.gate = _HostGate(self.cfg.per_host, self.cfg.host_delay)

    def fetch(self, url: str) -> bytes:
        """Download ``url``; raise SkipSample(reason) after retries are exhausted."""
        host = urlsplit(url).netloc.lower()
        attempt = 0
        while True:
            try:
                with self.gate(host):
                    return self._get(url)
            except SkipSample as e:
                if not is_retryable(e.reason) or attempt >= self.cfg.retries:
                    raise
            time.sleep(self.cfg.backoff * (2**attempt))
            attempt += 1

    def _get(self, url: str) -> bytes:
        cfg = self.cfg
        res = safe_fetch(
            url,
            max_bytes=cfg.max_bytes,
            timeout_s=cfg.total_timeout,
            read_timeout=cfg.timeout,
            allow_private=cfg.allow_private,
            max_redirects=cfg.max_redirects,
            user_agent=cfg.user_agent,
        )
        values = res.headers.get("x-robots-tag", [])
        if robots_optout(values, cfg.user_agent_token, cfg.optout_directives):
            raise SkipSample("robots_optout", f"X-Robots-Tag: {', '.join(values)}")
        return res.data
