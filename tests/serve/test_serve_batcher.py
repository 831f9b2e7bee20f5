"""MicroBatcher: batches bounded in size and wait, results in order, failures isolated."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from clipforge.serve.batcher import MicroBatcher


def _run(coro):
    return asyncio.run(coro)


def test_batches_are_bounded_and_ordered():
    seen: list[int] = []
    threads: set[str] = set()

    def fn(items):
        seen.append(len(items))
        threads.add(threading.current_thread().name)
        time.sleep(0.01)  # the model is busy: new requests pile up into the next batch
        return [x * 2 for x in items]

    async def go():
        b = MicroBatcher(fn, ThreadPoolExecutor(1, thread_name_prefix="model"), max_batch=8, max_wait_ms=5)
        out = await asyncio.gather(*(b.submit(i) for i in range(50)))
        await b.close()
        return out, b.stats

    out, stats = _run(go())
    assert out == [i * 2 for i in range(50)]
    assert max(seen) <= 8 and sum(seen) == 50 and len(seen) < 50
    assert stats.items == 50 and stats.batches == len(seen)
    assert all(t.startswith("model") for t in threads)  # never on the event loop thread


def test_unbatched_mode_and_lone_request_latency():
    sizes: list[int] = []

    def fn(items):
        sizes.append(len(items))
        return items

    async def go():
        b = MicroBatcher(fn, ThreadPoolExecutor(1), max_batch=1, max_wait_ms=0)
        await asyncio.gather(*(b.submit(i) for i in range(10)))
        lone = MicroBatcher(fn, ThreadPoolExecutor(1), max_batch=32, max_wait_ms=20)
        t = time.perf_counter()
        await lone.submit(1)
        return time.perf_counter() - t

    waited = _run(go())
    assert sizes[:10] == [1] * 10
    assert waited < 1.0  # a lone request waits about max_wait_ms, not forever


def test_failures_are_isolated():
    def fn(items):
        if "boom" in items:
            raise RuntimeError("model failed")
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    async def go():
        b = MicroBatcher(fn, ThreadPoolExecutor(1), max_batch=4, max_wait_ms=1)
        ok = await b.submit(3)
        with pytest.raises(ValueError, match="bad -1"):
            await b.submit(-1)
        with pytest.raises(RuntimeError, match="model failed"):
            await b.submit("boom")
        return ok, await b.submit(5)  # still serving after a failed batch

    assert _run(go()) == (3, 5)


def test_one_bad_item_fails_alone_in_its_batch():
    """A batch fn that raises for a poisoned batch: the bad item gets the error, the rest their results."""
    sizes: list[int] = []

    def fn(items):
        sizes.append(len(items))
        if "poison" in items:
            raise OverflowError("Python int too large to convert to C long")
        return [x.upper() for x in items]

    async def go():
        b = MicroBatcher(fn, ThreadPoolExecutor(1), max_batch=16, max_wait_ms=50)
        items = [f"q{i}" for i in range(15)]
        items.insert(7, "poison")
        out = await asyncio.gather(*(b.submit(x) for x in items), return_exceptions=True)
        await b.close()
        return items, out

    items, out = _run(go())
    assert isinstance(out[7], OverflowError)
    assert [o for i, o in enumerate(out) if i != 7] == [x.upper() for x in items if x != "poison"]
    assert sizes[0] == 16 and len(sizes) <= 1 + 2 * 4 + 1  # one batch, then about 2*log2(16) retries
