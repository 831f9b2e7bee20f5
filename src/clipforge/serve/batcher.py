"""Asyncio micro-batcher: concurrent requests share one model call, and the event loop never blocks.

Each request ``await``s :meth:`MicroBatcher.submit`. A collector task takes the first waiting item,
then keeps collecting until ``max_batch`` items or ``max_wait_ms`` have passed, and hands the batch to
``fn(items) -> results`` on the model's executor thread. While the model runs, new requests queue up,
so under load batches grow by themselves (and at low load a lone request waits at most max_wait_ms).
``max_batch=1`` turns batching off (one model call per request) for comparison.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    max_seen: int = 0
    busy_s: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0,
            "max_batch_seen": self.max_seen,
            "model_busy_s": round(self.busy_s, 3),
        }


class MicroBatcher:
    """Batch ``submit(item)`` calls into ``fn(list_of_items) -> list_of_results`` (same order).

    ``fn`` may return an ``Exception`` instance in place of a result to fail only that item. If it
    raises on a batch, the batch is split in halves and each half retried (:func:`call_isolated`), so
    one bad request fails alone and the others in its batch still get their answers.
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        executor: Executor,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 4096,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.fn = fn
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.name = name
        self.stats = BatchStats()
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("server shutting down"))

    async def submit(self, item: Any) -> Any:
        self.start()
        assert self._queue is not None
        if self._queue.qsize() >= self.max_queue:
            raise OverloadedError(f"{self.name}: {self._queue.qsize()} requests queued; retry later")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _collect(self) -> list[tuple[Any, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            live = [(it, f) for it, f in batch if not f.done()]  # a cancelled request is not computed
            if live:
                await self._compute(live)

    async def _compute(self, live: list[tuple[Any, asyncio.Future]]) -> None:
        """One model call for ``live`` on the executor; each future gets its own result or error."""
        t = time.perf_counter()
        try:
            items = [it for it, _ in live]
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, call_isolated, self.fn, items
            )
            if len(results) != len(live):
                raise RuntimeError(f"{self.name}: fn returned {len(results)} results for {len(live)} items")
        except Exception as e:  # fn broke its contract: fail this batch, keep serving
            results = [e] * len(live)
        finally:
            self.stats.busy_s += time.perf_counter() - t
        self.stats.batches += 1
        self.stats.items += len(live)
        self.stats.max_seen = max(self.stats.max_seen, len(live))
        for (_, f), r in zip(live, results):
            if f.done():
                continue
            if isinstance(r, Exception):
                f.set_exception(r)
            else:
                f.set_result(r)


def call_isolated(fn: Callable[[list[Any]], Sequence[Any]], items: list[Any]) -> list[Any]:
    """``fn(items)``; when it raises, bisect: halves are retried until the failing items stand alone and
    get the exception as their result. One bad item costs about 2*log2(batch) extra calls, not a batch."""
    try:
        return list(fn(items))
    except Exception as e:
        if len(items) == 1:
            return [e]
    mid = len(items) // 2
    return call_isolated(fn, items[:mid]) + call_isolated(fn, items[mid:])


class OverloadedError(RuntimeError):
    """The queue is full: the server answers 503 instead of queueing without bound."""
