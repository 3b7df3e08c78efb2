"""Pre-opened TCP sockets for the guest's new connections, private to one worker.

A guest SYN should turn into a ``connect()`` as fast as possible: the worker
takes a socket it created earlier instead of creating one on the packet
path, and refills the pool from its once-a-second deferred handler (as
passt's pools of 32 sockets per family, refilled every second).  Each worker
has its own pool, so taking a socket needs no lock (the seed's pools are
shared under a mutex; ours are per process).
"""

from __future__ import annotations

import socket

#: Sockets kept ready per address family.
POOL_SIZE = 32
FAMILIES = (socket.AF_INET, socket.AF_INET6)


def _new_socket(family: int) -> socket.socket:
    """A fresh non-blocking TCP socket with keepalive (a dead host peer is noticed)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


class SocketPool:
    """Ready TCP sockets of one worker, per address family."""

    def __init__(self, size: int = POOL_SIZE) -> None:
        """An empty pool that :meth:`refill` fills up to ``size`` per family."""
        self.size = size
        self.ready: dict[int, list[socket.socket]] = {family: [] for family in FAMILIES}
        #: Sockets handed out from the pool, and created on demand because it was empty.
        self.taken = 0
        self.missed = 0

    def take(self, family: int) -> socket.socket:
        """A non-blocking TCP socket of ``family``: a pre-opened one when there is one."""
        ready = self.ready.get(family)
        if ready:
            self.taken += 1
            return ready.pop()
        self.missed += 1
        return _new_socket(family)

    def refill(self) -> None:
        """Top every family up to the pool size (deferred handler); a family the host lacks stays empty."""
        for family, ready in self.ready.items():
            try:
                while len(ready) < self.size:
                    ready.append(_new_socket(family))
            except OSError:
                continue

    def close(self) -> None:
        """Close every pre-opened socket."""
        for ready in self.ready.values():
            for sock in ready:
                sock.close()
            ready.clear()
