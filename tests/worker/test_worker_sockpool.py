"""The worker's pre-opened TCP sockets."""

from __future__ import annotations

import socket

from shardswitch.worker.sockpool import SocketPool


def test_take_uses_pool_then_creates_and_refill_tops_up() -> None:
    """Taken sockets come from the pool while it lasts; an empty pool still answers; refill restores it."""
    pool = SocketPool(size=2)
    pool.refill()
    assert [len(pool.ready[f]) for f in (socket.AF_INET, socket.AF_INET6)] == [2, 2]
    taken = [pool.take(socket.AF_INET) for _ in range(3)]
    assert (pool.taken, pool.missed) == (2, 1)
    assert all(s.family == socket.AF_INET and s.type == socket.SOCK_STREAM and not s.getblocking() for s in taken)
    pool.refill()
    assert len(pool.ready[socket.AF_INET]) == 2
    pool.close()
    assert pool.ready[socket.AF_INET] == [] and all(s.fileno() >= 0 for s in taken)
    for s in taken:
        s.close()
