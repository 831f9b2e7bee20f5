"""Bounded, order-preserving thread-pool map with per-item error capture.

Threads suit this layer's work: downloads wait on the network and Pillow releases the GIL while it
decodes/encodes. Only ``4 x workers`` items are in flight, so a million-row input never sits in memory,
and results come back in input order, so shard contents are reproducible.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from clipforge.data.decode import SkipSample

T = TypeVar("T")


def ordered_map(
    fn: Callable[[T], Any], items: Iterable[T], workers: int, window: int | None = None
) -> Iterator[tuple[T, Any]]:
    """Yield ``(item, fn(item))`` in input order; a SkipSample (or any error, as ``ingest_error``) is
    returned as the result instead of raised, so one bad item costs one item, not the run.

    At most ``window`` items (default ``4 * workers``) are in flight or done-but-unyielded: that bounds
    memory, and a larger window keeps the workers busy behind one slow item (a URL timing out at the head).
    """

    def call(item: T) -> Any:
        try:
            return fn(item)
        except SkipSample as e:
            return e
        except Exception as e:
            return SkipSample("ingest_error", f"{type(e).__name__}: {str(e)[:200]}")

    workers = max(1, workers)
    if workers == 1:
        for item in items:
            yield item, call(item)
        return
    limit = max(workers, window or 4 * workers)
    pending: deque[tuple[T, Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            pending.append((item, pool.submit(call, item)))
            if len(pending) >= limit:
                head, fut = pending.popleft()
                yield head, fut.result()
        while pending:
            head, fut = pending.popleft()
            yield head, fut.result()
