"""A stand-in worker for protocol modules under test: the WorkerPort, with no rings and no process.

Protocol modules depend on :class:`shardswitch.worker.port.WorkerPort` only,
so a test can run them on this object: frames for the guest stay in
``queue`` for the test to read (``flush`` does nothing, there is no RX ring,
so TCP data is built as frames), host descriptors are watched with an epoll
of its own that :meth:`StandInWorker.poll` runs once.  mypy checks it
against the interface (``pyproject.toml`` lists this file).
"""

from __future__ import annotations

import select
from collections import deque
from typing import Callable

from shardswitch.net.drop import DropReason
from shardswitch.net.endpoint import GuestEndpoint
from shardswitch.net.params import GuestParams, ResolvedParams
from shardswitch.virtio.netdev import RxWriter
from shardswitch.worker.counters import Counters, Event
from shardswitch.worker.flow import FlowLayer
from shardswitch.worker.fwd import Forwarding
from shardswitch.worker.port import READABLE, RxOffloads, WorkerPort


class StandInWorker:
    """The parts of a worker that protocol modules use, with frames for the guest left in ``queue``."""

    def __init__(self, params: GuestParams, mapped: tuple[str, ...] = ()) -> None:
        """An endpoint for ``params``, no flow table, no other workers; ``mapped``: addresses meaning loopback."""
        self.pair = 0
        self.endpoint = GuestEndpoint(params)
        self.params: ResolvedParams = self.endpoint.resolved
        self.queue: deque[bytes] = deque()
        self.offloads = RxOffloads()
        self.counters = Counters()
        self.epoll = select.epoll()
        self.sockets: dict[int, Callable[[], None]] = {}
        self.flows = FlowLayer(self, None, Forwarding(self, mapped))

    @property
    def guest_mac(self) -> bytes | None:
        """The guest's MAC as the endpoint learnt it."""
        return self.endpoint.guest_mac

    def flush(self) -> None:
        """Frames stay in ``queue`` for the test to read."""

    def watch(self, fd: int, callback: Callable[[], None], events: int = READABLE) -> None:
        """Watch a descriptor like the worker does."""
        self.epoll.register(fd, events)
        self.sockets[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        """Change a watched descriptor's events."""
        self.epoll.modify(fd, events)

    def unwatch(self, fd: int) -> None:
        """Stop watching like the worker does."""
        if self.sockets.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def drop(self, reason: DropReason) -> None:
        """Count a drop."""
        self.counters.drops[reason] += 1

    def count(self, event: Event) -> None:
        """Count an event."""
        self.counters.events[event] += 1

    @property
    def rx_writer(self) -> RxWriter | None:
        """No RX ring: nothing is written in place."""
        return None

    def rx_wait(self) -> bool:
        """Never called without an RX ring."""
        raise AssertionError("no RX ring")

    def rx_written(self, frames: int, nbytes: int) -> None:
        """Never called without an RX ring."""
        raise AssertionError("no RX ring")

    def rx_broken(self, err: Exception) -> None:
        """Never called without an RX ring."""
        raise AssertionError("no RX ring")

    def poll(self, timeout: float = 0.2) -> None:
        """Run the callbacks of ready descriptors once."""
        for fd, _mask in self.epoll.poll(timeout):
            callback = self.sockets.get(fd)
            if callback is not None:
                callback()

    def close(self) -> None:
        """Close the flows left and the epoll."""
        self.flows.close_all()
        self.epoll.close()


def _conforms(worker: StandInWorker) -> WorkerPort:
    """mypy checks here that the stand-in is a WorkerPort."""
    return worker
