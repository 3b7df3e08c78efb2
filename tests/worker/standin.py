"""A stand-in worker for protocol modules under test: the WorkerPort, with no rings and no process.

Protocol modules depend on :class:`shardswitch.worker.port.WorkerPort` only,
so a test can run them on this object: frames for the guest stay in
``queue`` for the test to read (``flush`` does nothing, there is no RX ring,
so TCP data is built as frames), host descriptors are watched with an epoll
of its own that :meth:`StandInWorker.poll` runs once.  mypy checks it
against the interface (``pyproject.toml`` lists this file).
"""

from __future__ import annotations

import logging
import select
from collections import deque
from typing import Callable

from shardswitch.ipc import ForwardSetup
from shardswitch.loglimit import LogLimiter
from shardswitch.net.endpoint import GuestEndpoint
from shardswitch.net.params import GuestParams, ResolvedParams
from shardswitch.virtio.netdev import RxWriter
from shardswitch.worker.counters import Counters
from shardswitch.worker.flow import FlowLayer
from shardswitch.worker.fwd import Forwarding
from shardswitch.worker.port import CountingPort, EpollWatches, RxOffloads, WorkerPort


class StandInWorker(EpollWatches, CountingPort):
    """The parts of a worker that protocol modules use, with frames for the guest left in ``queue``."""

    def __init__(self, params: GuestParams, mapped: tuple[str, ...] = ()) -> None:
        """An endpoint for ``params``, no flow table, no other workers; ``mapped``: addresses meaning loopback."""
        self.pair = 0
        self.endpoint = GuestEndpoint(params)
        self.params: ResolvedParams = self.endpoint.resolved
        self.queue: deque[bytes] = deque()
        self.offloads = RxOffloads()
        self.counters = Counters()
        self.loglimit = LogLimiter(logging.getLogger("shardswitch.worker"))
        self.epoll = select.epoll()
        self.sockets: dict[int, Callable[[], None]] = {}
        self.deferred: list[Callable[[], None]] = []
        self.flows = FlowLayer(self, None, Forwarding(self, ForwardSetup(map_host_loopback=mapped)))

    @property
    def guest_mac(self) -> bytes | None:
        """The guest's MAC as the endpoint learnt it."""
        return self.endpoint.guest_mac

    def flush(self) -> None:
        """Frames stay in ``queue`` for the test to read."""

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
        """Run the callbacks of ready descriptors once, then the deferred ones (no wait when some are)."""
        for fd, _mask in self.epoll.poll(0 if self.deferred else timeout):
            callback = self.sockets.get(fd)
            if callback is not None:
                callback()
        self.run_deferred(self._fault)

    @staticmethod
    def _fault() -> None:
        """A deferred callback failed: the test sees the exception."""
        raise

    def close(self) -> None:
        """Close the flows left and the epoll."""
        self.flows.close_all()
        self.epoll.close()


def _conforms(worker: StandInWorker) -> WorkerPort:
    """mypy checks here that the stand-in is a WorkerPort."""
    return worker
