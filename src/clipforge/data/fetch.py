"""Polite, bounded image downloading: timeouts, retries with exponential backoff, per-host limits, opt-outs.

Used by ingest from thread-pool workers (downloads are I/O bound, so threads, not processes). Each host
gets at most ``per_host`` requests in flight and a minimum ``host_delay`` between request starts, so a
table full of one site's URLs never hammers it. ``X-Robots-Tag`` opt-outs are honoured the way
img2dataset does (``noai``, ``noimageai``, ``noindex``, ``noimageindex``, optionally scoped to a user
agent token): the image is skipped and recorded as ``robots_optout`` and never retried.

Failures raise :class:`~clipforge.data.decode.SkipSample` with a reason; :func:`is_retryable` tells
which ones are worth a second run (timeouts, connection errors, HTTP 408/425/429/5xx).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from clipforge.data.decode import SkipSample

RETRYABLE_REASONS = {"timeout", "connection_error", "http_408", "http_425", "http_429"}
DEFAULT_OPTOUT = ("noai", "noimageai", "noindex", "noimageindex")


def is_retryable(reason: str) -> bool:
    return reason in RETRYABLE_REASONS or (reason.startswith("http_5") and len(reason) == 8)


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
    """Thread-safe downloader (one ``requests.Session`` with a pool sized for the thread pool)."""

    def __init__(self, cfg: FetchConfig | None = None, pool_size: int = 32) -> None:
        self.cfg = cfg or FetchConfig()
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = self.cfg.user_agent
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
        start = time.monotonic()
        try:
            with self.session.get(url, timeout=cfg.timeout, stream=True) as r:
                if r.status_code != 200:
                    raise SkipSample(f"http_{r.status_code}", url)
                values = r.raw.headers.getlist("X-Robots-Tag") if hasattr(r.raw.headers, "getlist") else []
                if robots_optout(values, cfg.user_agent_token, cfg.optout_directives):
                    raise SkipSample("robots_optout", f"X-Robots-Tag: {', '.join(values)}")
                chunks, size = [], 0
                for chunk in r.iter_content(1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > cfg.max_bytes:
                        raise SkipSample("too_large", f"> {cfg.max_bytes} bytes")
                    if time.monotonic() - start > cfg.total_timeout:
                        raise SkipSample("timeout", f"download took > {cfg.total_timeout}s")
                return b"".join(chunks)
        except SkipSample:
            raise
        except (requests.Timeout, TimeoutError) as e:
            raise SkipSample("timeout", f"{type(e).__name__}: {str(e)[:200]}") from None
        except requests.ConnectionError as e:
            # requests wraps read timeouts during streaming in ConnectionError
            reason = "timeout" if "timed out" in str(e).lower() else "connection_error"
            raise SkipSample(reason, f"{type(e).__name__}: {str(e)[:200]}") from None
        except requests.RequestException as e:  # invalid URL, too many redirects...
            raise SkipSample("bad_url", f"{type(e).__name__}: {str(e)[:200]}") from None
