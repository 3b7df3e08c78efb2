"""fence(): callable repeatedly and from several threads, never left holding its lock, cheap."""

from __future__ import annotations

import threading
import time

from shardswitch.virtio import barrier
from shardswitch.virtio.barrier import fence


def test_fence_leaves_no_state_behind() -> None:
    """Each call acquires and releases: the lock is free afterwards, every time."""
    for _ in range(1000):
        fence()
    assert not barrier._FENCE_LOCK.locked()


def test_fence_from_concurrent_threads() -> None:
    """Concurrent callers serialise on the lock but never deadlock."""
    def spin() -> None:
        """Call fence() in a loop."""
        for _ in range(20000):
            fence()

    threads = [threading.Thread(target=spin) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert not barrier._FENCE_LOCK.locked()


def test_fence_is_cheap() -> None:
    """Generous bound (documented cost is ~60 ns): well under 2 us per call even on a busy machine."""
    n = 100_000
    start = time.perf_counter()
    for _ in range(n):
        fence()
    assert (time.perf_counter() - start) / n < 2e-6
