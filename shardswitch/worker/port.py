"""The written interface between a worker and its protocol modules.

Theory of operation.  The protocol modules (:mod:`~shardswitch.worker.ping`,
:mod:`~shardswitch.worker.udp`, :mod:`~shardswitch.worker.tcp` and the TCP
helpers) and the flow layer (:mod:`~shardswitch.worker.flow`) never see the
:class:`~shardswitch.worker.worker.Worker` class: they depend on
:class:`WorkerPort`, the few things a worker offers them, and nothing else.
mypy checks both the real worker and the test stand-ins against it.

What a port offers:

* frames for the guest: append complete Ethernet frames to :attr:`~WorkerPort.queue`
  (in order), then :meth:`~WorkerPort.flush` writes what fits into the RX ring;
  TCP writes in place into RX buffers through the ``rx_*`` members;
* readiness of host descriptors: :meth:`~WorkerPort.watch`,
  :meth:`~WorkerPort.modify`, :meth:`~WorkerPort.unwatch` (the worker's one
  epoll);
* counting: :meth:`~WorkerPort.drop` (a frame lost, with its reason) and
  :meth:`~WorkerPort.count` (an event);
* the guest's parameters (:attr:`~WorkerPort.params`, wire-ready; the
  guest's MAC once learnt), this worker's queue pair and the RX ring's
  offloads (:class:`RxOffloads`).
"""

from __future__ import annotations

import select
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from shardswitch.loglimit import LogLimiter
from shardswitch.net.drop import DropReason
from shardswitch.net.params import ResolvedParams
from shardswitch.virtio.netdev import RxWriter
from shardswitch.worker.counters import Counters, Event

#: Readiness a watched descriptor reports by default.
READABLE = select.EPOLLIN
#: Frames waiting in a port's queue for RX buffers before the oldest are dropped (RX_NO_BUFFERS).
QUEUE_MAX = 1024


@dataclass(slots=True)
class RxOffloads:
    """What the running RX ring negotiated (all False while no RX ring runs).

    ``data_valid``: GUEST_CSUM - frames carry DATA_VALID, TCP/UDP data need no
    checksum.  ``tso4`` / ``tso6``: GUEST_TSO4/6 on top - TCP data may go in
    64 KiB GSO frames.
    """

    data_valid: bool = False
    tso4: bool = False
    tso6: bool = False


class EpollWatches:
    """Host descriptors watched through one epoll, each with its callback: the watch part of a WorkerPort.

    The class using it creates ``epoll``, ``sockets`` and ``deferred``; its loop
    calls ``sockets[fd]()`` for each ready descriptor, then :meth:`run_deferred`,
    and does not sleep while ``deferred`` holds anything.
    """

    epoll: select.epoll
    #: Watched descriptors: descriptor -> callback.
    sockets: dict[int, Callable[[], None]]
    #: Callbacks to run once the events at hand are handled (:meth:`defer`).
    deferred: list[Callable[[], None]]

    def watch(self, fd: int, callback: Callable[[], None], events: int = READABLE) -> None:
        """Call ``callback`` whenever ``fd`` (a host socket of a flow, a listener) reports ``events``."""
        self.epoll.register(fd, events)
        self.sockets[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        """Change the events a watched ``fd`` reports."""
        try:
            self.epoll.modify(fd, events)
        except OSError:
            pass

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""
        if self.sockets.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def defer(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the events at hand are handled (the end of the loop's round)."""
        self.deferred.append(callback)

    def run_deferred(self, fault: Callable[[], None]) -> None:
        """Run the callbacks deferred so far, once each; those they defer wait for the next round (the loop
        does not sleep meanwhile).  ``fault`` handles an exception of one callback (the others still run)."""
        batch, self.deferred = self.deferred, []
        for callback in batch:
            try:
                callback()
            except Exception:
                fault()


class CountingPort:
    """The counting part of a WorkerPort, over the ``counters`` the class using it creates."""

    counters: Counters

    def drop(self, reason: DropReason) -> None:
        """Count one frame lost for ``reason``."""
        self.counters.drops[reason] += 1

    def count(self, event: Event) -> None:
        """Count one ``event``."""
        self.counters.events[event] += 1


class WorkerPort(Protocol):
    """What a worker offers its protocol modules and flow layer."""

    #: This worker's queue pair (the owner recorded in the flow table).
    pair: int
    #: The guest's parameters, wire-ready (our MAC, its addresses, MTU).
    params: ResolvedParams
    #: Frames for the guest, in order, waiting for the RX ring.
    queue: deque[bytes]
    #: Offloads of the running RX ring.
    offloads: RxOffloads
    #: Rate limits for log lines the guest can cause (full table, refused sockets, internal errors).
    loglimit: LogLimiter

    @property
    def guest_mac(self) -> bytes | None:
        """The guest's MAC address, once learnt (from its frames or from another worker)."""

    def flush(self) -> None:
        """Write queued frames into the guest's RX buffers, as many as fit."""

    def watch(self, fd: int, callback: Callable[[], None], events: int = READABLE) -> None:
        """Call ``callback`` whenever ``fd`` reports ``events``."""

    def defer(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the events at hand are handled (the end of the loop's round)."""

    def modify(self, fd: int, events: int) -> None:
        """Change the events a watched ``fd`` reports."""

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""

    def drop(self, reason: DropReason) -> None:
        """Count one frame lost for ``reason``."""

    def count(self, event: Event) -> None:
        """Count one ``event``."""

    @property
    def rx_writer(self) -> RxWriter | None:
        """The running RX ring's writer, for frames written in place (None: no RX ring)."""

    def rx_wait(self) -> bool:
        """The RX ring is out of buffers: ask for a kick on the guest's refill. True if buffers came meanwhile."""

    def rx_written(self, frames: int, nbytes: int) -> None:
        """``frames`` were written in place into the RX ring: count, publish and signal the guest."""

    def rx_broken(self, err: Exception) -> None:
        """The guest broke the RX ring while it was written in place: stop it (counted)."""
