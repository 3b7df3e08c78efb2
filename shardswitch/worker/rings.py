"""A worker's two vrings: one slot per ring, holding the virtqueue and its eventfds.

A slot is *stopped* (no virtqueue), *running*, or *broken*: the driver put
something in the ring that the virtqueue refused (a looping chain, a buffer
outside guest memory...).  A broken ring is left alone - its kicks are no
longer watched - until the front-end sets it up anew; the worker and its
other ring go on.
"""

from __future__ import annotations

import logging
import os
from enum import Enum

from shardswitch.ipc import RingStart, RingState, close_fds
from shardswitch.vhost.wire import VirtioFeature
from shardswitch.virtio.memory import GuestMemory
from shardswitch.virtio.netdev import RxWriter, vnet_hdr_len
from shardswitch.virtio.fastring import make_virtqueue
from shardswitch.virtio.virtqueue import Virtqueue

log = logging.getLogger("shardswitch.worker")

NO_FD = -1


class SlotState(str, Enum):
    """What a ring slot is doing."""

    STOPPED = "stopped"
    RUNNING = "running"
    BROKEN = "broken"


class RingSlot:
    """One vring of a worker's queue pair."""

    def __init__(self, index: int) -> None:
        """An empty, stopped slot for vring ``index``."""
        self.index = index
        self.state = SlotState.STOPPED
        self.vq: Virtqueue | None = None
        self.kick_fd = NO_FD
        self.call_fd = NO_FD
        self.hdr_len = 12
        self.writer: RxWriter | None = None
        self.error = ""
        self.kicks = 0
        self.calls = 0
        self.num = 0
        #: Guest-physical address of the used ring while this ring logs written pages, else -1.
        self.log_addr = -1
        #: Where the ring stopped or broke, for GET_VRING_BASE after it is gone.
        self.last_avail = 0

    @property
    def is_rx(self) -> bool:
        """True for the receive ring (even index)."""
        return self.index % 2 == 0

    def start(self, mem: GuestMemory, msg: RingStart, fds: list[int]) -> None:
        """Build the virtqueue from a RingStart (raises VirtqueueError / GuestMemoryError).

        Takes ownership of ``fds`` (kick then call, as flagged in ``msg``).
        """
        fds = list(fds)
        self.kick_fd = fds.pop(0) if msg.has_kick and fds else NO_FD
        self.call_fd = fds.pop(0) if msg.has_call and fds else NO_FD
        close_fds(fds)
        self.num = msg.num
        self.log_addr = -1
        self.hdr_len = vnet_hdr_len(msg.features)
        vq = make_virtqueue(mem, msg.num, msg.desc, msg.avail, msg.used, msg.last_avail,
                            event_idx=bool(msg.features & VirtioFeature.EVENT_IDX),
                            indirect=bool(msg.features & VirtioFeature.INDIRECT_DESC))
        if msg.resume_from_used:
            vq.last_avail = vq.used_idx()
        self.vq = vq
        if self.is_rx:
            self.writer = RxWriter(vq, self.hdr_len, bool(msg.features & VirtioFeature.MRG_RXBUF))
        self.state = SlotState.RUNNING
        self.error = ""

    def notify(self) -> None:
        """Signal the driver through the call eventfd (if it gave one)."""
        if self.call_fd != NO_FD:
            os.eventfd_write(self.call_fd, 1)
            self.calls += 1

    def _release(self) -> None:
        """Drop the virtqueue (and its views of guest memory), remembering its position."""
        if self.vq is not None:
            self.last_avail = self.vq.last_avail
            self.vq.release()
        self.vq = None
        self.writer = None

    def stop(self) -> int:
        """Stop the ring, close its eventfds, and return the next avail index."""
        self._release()
        close_fds([fd for fd in (self.kick_fd, self.call_fd) if fd != NO_FD])
        self.kick_fd = self.call_fd = NO_FD
        self.state = SlotState.STOPPED
        return self.last_avail

    def break_(self, reason: str) -> None:
        """Mark the ring broken: keep the fds (for a later stop) but stop serving it."""
        log.error("vring %d broken: %s", self.index, reason)
        self._release()
        self.state = SlotState.BROKEN
        self.error = reason

    def snapshot(self) -> RingState:
        """This ring's state for ``shardswitch status``."""
        vq = self.vq
        return RingState(index=self.index, state=self.state.value, num=self.num,
                         last_avail=vq.last_avail if vq else self.last_avail,
                         used_idx=vq.used_idx() if vq else 0,
                         kicks=self.kicks, calls=self.calls, error=self.error)
