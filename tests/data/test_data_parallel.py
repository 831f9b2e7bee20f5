"""ordered_map's window: how many items run behind a slow head item, and that it stays bounded."""

from __future__ import annotations

import threading

from clipforge.data.parallel import ordered_map


def _blocked_head(needed: int, wait_s: float):
    """fn where item 0 waits until ``needed`` other items have run; returns whether they did in time."""
    done: list[int] = []
    release = threading.Event()
    lock = threading.Lock()

    def fn(i: int) -> object:
        if i == 0:
            return release.wait(wait_s)
        with lock:
            done.append(i)
            if len(done) >= needed:
                release.set()
        return i

    return fn


def test_a_wide_window_keeps_workers_busy_behind_a_slow_head() -> None:
    out = list(ordered_map(_blocked_head(needed=15, wait_s=10), range(40), workers=2, window=16))
    assert [item for item, _ in out] == list(range(40))  # input order kept
    assert out[0][1] is True  # 15 later items ran while item 0 was still running


def test_the_default_window_stays_bounded() -> None:
    consumed: list[int] = []

    def items():
        for i in range(40):
            consumed.append(i)
            yield i

    it = ordered_map(_blocked_head(needed=15, wait_s=1.0), items(), workers=2)
    first = next(it)
    # default window 4 * workers = 8: only 7 items could run behind the head, so it timed out
    assert first == (0, False)
    assert len(consumed) == 8
    assert [i for i, _ in it] == list(range(1, 40))
