"""The worker's packet path: guest TX ring -> protocol endpoint -> guest RX ring.

Theory of operation.  One :class:`Datapath` per worker owns what the packet
path touches per frame: the two ring slots (:class:`~shardswitch.worker.rings.RingSlot`),
the bounded queue of frames for the guest, the counters, the capture hook and
the offloads the rings negotiated.  It knows nothing of the worker: frames go
to the protocol side through one callable, ``handle_frame`` (the worker's
error boundary), and the few things it needs from the worker's loop (the
epoll that watches kick descriptors, what to do when the guest refilled RX
buffers) are given at construction.  The worker's loop calls
:meth:`Datapath.on_kick` and :meth:`Datapath.poll`; the protocol modules reach
it through the worker's :class:`~shardswitch.worker.port.WorkerPort`
(``queue``, ``offloads``, ``flush`` and the ``rx_*`` calls).

A kick on the TX ring means the guest posted frames.  :meth:`Datapath.service_tx`
drains the ring in batches of at most :data:`BATCH` chains with kicks
disabled: each frame is viewed in place in guest memory (a memoryview, no
copy; a frame the guest split over several buffers, as a Linux TSO frame,
is gathered into ``tx_scratch``, one copy), handed to ``handle_frame``, and
its chain is returned as used.  The used index is published once per batch
and the driver is signalled only when EVENT_IDX says it wants to be.  Kicks
are then re-enabled; if the guest added frames in the meantime (the
re-check after the fence), the loop drains again, so no kick is ever lost.

Checksum offload: when the TX ring negotiated VIRTIO_NET_F_CSUM
(``tx_partial_csum``), the flags byte of each chain's virtio-net header is
read beside the frame (by ``pop_frame``) and NEEDS_CSUM goes to
``handle_frame`` as ``csum_partial``: the L4 parsers then skip verifying
that frame's checksum.

Replies (ARP, DHCP) and everything the flows send go to the bounded queue
(``queue``), which :meth:`Datapath.deliver_rx` writes into the guest's
posted RX buffers (with MRG_RXBUF a frame may span several).  When the
guest has no buffers left, the frames wait and RX kicks are enabled, so the
guest's next buffer refill wakes us; beyond :data:`~shardswitch.worker.port.QUEUE_MAX`
frames the oldest are dropped and counted.  RX kicks stay disabled
otherwise: the guest refills its RX ring constantly and we do not want a
wake-up for each refill.

A ring the guest breaks (a looping chain, a buffer outside memory) breaks
alone (:meth:`Datapath.guard`): its kicks are no longer watched and the other
ring goes on.  Everything here is private to the worker process: no lock,
no shared state.
"""

from __future__ import annotations

import logging
import select
import time
from collections import deque
from typing import Callable

from shardswitch.ipc import RingStart
from shardswitch.net.drop import DropReason
from shardswitch.pcap import FrameSink, PcapWriter
from shardswitch.vhost.wire import VirtioFeature
from shardswitch.virtio.dirtylog import DirtyLog
from shardswitch.virtio.memory import GuestMemory, GuestMemoryError
from shardswitch.virtio.netdev import RxWriter, VnetHdrFlags
from shardswitch.virtio.virtqueue import GATHER_MAX, VirtqueueError
from shardswitch.worker.counters import Counters, Event
from shardswitch.worker.port import QUEUE_MAX, RxOffloads
from shardswitch.worker import trace
from shardswitch.worker.rings import NO_FD, RingSlot, SlotState
from shardswitch.worker.trace import FrameTrace

log = logging.getLogger("shardswitch.worker")

#: Chains taken from the TX ring before the worker looks at its other events.
BATCH = 256
_NEEDS_CSUM = int(VnetHdrFlags.NEEDS_CSUM)
RX_NO_BUFFERS = DropReason.RX_NO_BUFFERS
RX_RING_DOWN = DropReason.RX_RING_DOWN
RX_TOO_BIG = DropReason.RX_TOO_BIG
TX_EMPTY_FRAME = DropReason.TX_EMPTY_FRAME

#: What the datapath hands each guest frame to: (frame, now, replies, csum_partial).
FrameHandler = Callable[[memoryview, float, list[bytes], bool], None]


class Datapath:
    """One worker's rings, queue of frames for the guest, counters and capture hook."""

    def __init__(self, pair: int, counters: Counters, epoll: select.epoll, handle_frame: FrameHandler, *,
                 reflect: bool = False) -> None:
        """The datapath of queue pair ``pair``; kick descriptors are watched on ``epoll``.

        ``reflect``: diagnostic mode, every TX frame goes straight back into an RX buffer.
        """
        self.pair = pair
        self.counters = counters
        self.epoll = epoll
        self.handle_frame = handle_frame
        self.reflect = reflect
        self.rx = RingSlot(2 * pair)
        self.tx = RingSlot(2 * pair + 1)
        #: Frames for the guest, waiting for RX buffers.
        self.queue: deque[bytes] = deque()
        #: Packet capture (--pcap, shardswitch capture) and --trace: every frame from the guest (the RX
        #: writer has the hook of frames to the guest); see :meth:`set_capture`.
        self.capture: FrameSink | None = None
        #: The capture file's writer (None: no capture).
        self.pcap: PcapWriter | None = None
        #: --trace's sinks (None: off).
        self.trace: FrameTrace | None = None
        #: The hook of frames to the guest, given to the RX writer when its ring starts.
        self.rx_capture: FrameSink | None = None
        #: The TX ring negotiated CSUM: guest frames may carry partial checksums (NEEDS_CSUM).
        self.tx_partial_csum = False
        #: What the running RX ring negotiated (DATA_VALID, TSO).
        self.offloads = RxOffloads()
        #: Where TX frames split over several buffers are gathered, one after the other.
        self.tx_scratch = memoryview(bytearray(GATHER_MAX))
        #: TX needs another round without waiting for a kick (batch limit hit, or polling).
        self.tx_again = False
        #: Called when the guest refilled RX buffers and no frame waits (flows writing in place go on).
        self.on_rx_buffers: Callable[[], None] = lambda: None

    # -- ring life ----------------------------------------------------------------

    def slot(self, index: int) -> RingSlot | None:
        """The slot of vring ``index`` if it belongs to this pair."""
        if index == self.rx.index:
            return self.rx
        if index == self.tx.index:
            return self.tx
        return None

    def start_ring(self, slot: RingSlot, mem: GuestMemory, message: RingStart, fds: list[int],
                   dirty: DirtyLog | None) -> str:
        """Start ``slot`` from ``message`` (taking ``fds``); the refusal's text, or "" once it runs.

        The caller answers the coordinator, then calls :meth:`after_start`.
        """
        self.stop_slot(slot)
        try:
            slot.start(mem, message, fds)
            if slot.writer is not None:
                slot.writer.capture = self.rx_capture
        except (VirtqueueError, GuestMemoryError) as err:
            slot.stop()
            slot.error = str(err)
            return str(err)
        self._offloads(slot, message.features)
        slot.log_addr = message.log_addr
        if message.log_addr >= 0 and dirty is not None and slot.vq is not None:
            slot.vq.start_logging(dirty, message.log_addr)
            self.counters.events[Event.DIRTY_LOG_RING] += 1
        if slot.kick_fd != NO_FD:
            self.epoll.register(slot.kick_fd, select.EPOLLIN)
        return ""

    def after_start(self, slot: RingSlot) -> None:
        """A ring just started: an interrupt for what a previous back-end used, then the work waiting."""
        # A restart (QEMU restarts the rings after a migration, for one): what we used under the previous
        # call eventfd may never have reached the guest as an interrupt.  One interrupt too many is harmless.
        if slot.vq is not None and slot.vq.used_idx():
            slot.notify()
        # Work may already be waiting (a restart, or a guest that posted before we started).
        if slot.is_rx:
            self.guard(slot, self.deliver_rx)
        else:
            self.tx_again = True

    def _offloads(self, slot: RingSlot, features: int) -> None:
        """Checksum offloads of a ring that just started, from its negotiated ``features``.

        TX: CSUM lets the guest send partial checksums.  RX: with GUEST_CSUM
        every frame's header says DATA_VALID and the TCP/UDP builders may
        skip summing data; GUEST_TSO4/6 on top let TCP send 64 KiB GSO frames.
        """
        if slot.is_rx:
            offloads = self.offloads
            offloads.data_valid = bool(features & VirtioFeature.GUEST_CSUM)
            offloads.tso4 = offloads.data_valid and bool(features & VirtioFeature.GUEST_TSO4)
            offloads.tso6 = offloads.data_valid and bool(features & VirtioFeature.GUEST_TSO6)
            if slot.writer is not None:
                slot.writer.set_flags(VnetHdrFlags.DATA_VALID if offloads.data_valid else 0)
        else:
            self.tx_partial_csum = bool(features & VirtioFeature.CSUM)

    def _unwatch_kick(self, slot: RingSlot) -> None:
        """Stop watching ``slot``'s kick descriptor."""
        if slot.kick_fd != NO_FD:
            try:
                self.epoll.unregister(slot.kick_fd)
            except (OSError, ValueError):
                pass

    def stop_slot(self, slot: RingSlot) -> int:
        """Stop a slot, unwatching its kick descriptor; the next avail index."""
        self._unwatch_kick(slot)
        if slot.is_rx:
            # Frames built for a running ring may rely on its offloads (DATA_VALID, TSO): they go with it.
            # Frames built while no RX ring runs keep full checksums and wait for the next driver (the
            # resets and data of flows a migration brought in, before the guest's rings start).
            if self.queue and slot.state is not SlotState.STOPPED:
                self.drop_pending()
            self.offloads.data_valid = self.offloads.tso4 = self.offloads.tso6 = False
        return slot.stop()

    def stop_all(self) -> None:
        """Stop both rings (before memory goes away)."""
        self.stop_slot(self.rx)
        self.stop_slot(self.tx)

    def guard(self, slot: RingSlot, action: Callable[[], object]) -> bool:
        """Run ring work; a broken virtqueue breaks only this ring. Returns the action's result."""
        try:
            return bool(action())
        except (VirtqueueError, GuestMemoryError) as err:
            self.break_ring(slot, err)
            return False

    def break_ring(self, slot: RingSlot, err: Exception) -> None:
        """The guest broke ``slot``'s virtqueue: stop watching it and mark it broken (counted)."""
        self._unwatch_kick(slot)
        self.counters.events[Event.BROKEN_RING] += 1
        slot.break_(str(err))

    def set_capture(self, capture: PcapWriter | None) -> None:
        """Record every frame into ``capture`` from now on (None: stop); with --trace on, the trace too."""
        self.pcap = capture
        self.capture, self.rx_capture = trace.sinks(self.trace, capture)
        if self.rx.writer is not None:
            self.rx.writer.capture = self.rx_capture

    # -- the loop's calls ---------------------------------------------------------

    def on_kick(self, slot: RingSlot) -> None:
        """``slot``'s kick eventfd fired (already read by the caller)."""
        slot.kicks += 1
        if slot.state is not SlotState.RUNNING:
            return
        if slot.is_rx:
            self.guard(slot, self.deliver_rx)
            if not self.queue:
                self.on_rx_buffers()
        else:
            self.tx_again = self.guard(slot, self.service_tx)

    def polled(self) -> bool:
        """True when a running ring has no kick descriptor and must be polled."""
        rx, tx = self.rx, self.tx     # runs twice per loop iteration: no generator
        return ((rx.kick_fd == NO_FD and rx.state is SlotState.RUNNING)
                or (tx.kick_fd == NO_FD and tx.state is SlotState.RUNNING))

    def poll(self) -> None:
        """Another TX round when one is due (batch limit hit) or the rings are polled; queued frames out."""
        if self.tx_again or self.polled():
            self.tx_again = False
            if self.tx.state is SlotState.RUNNING:
                self.tx_again = self.guard(self.tx, self.service_tx)
            if self.rx.state is SlotState.RUNNING and self.queue:
                self.guard(self.rx, self.deliver_rx)

    # -- TX -----------------------------------------------------------------------

    def service_tx(self) -> bool:
        """Drain the TX ring; True when a batch limit left frames for another round."""
        slot = self.tx
        vq = slot.vq
        if vq is None:
            return False
        counters = self.counters
        drops = counters.drops
        pending = self.queue
        hdr_len = slot.hdr_len
        partial_ok = self.tx_partial_csum
        handle_frame = self.handle_frame
        # Diagnostic mode: every frame goes straight back into an RX buffer (one copy).
        mirror = self.rx.writer if self.reflect else None
        # RxWriter.put refuses both a frame that only lacks buffers now and one that can never fit
        # (too_big rises): tell them apart like deliver_rx does, or status blames missing buffers
        # for frames the guest's buffers are too small for (seen with testpmd's mrg_rxbuf=0).
        too_big_seen = mirror.too_big if mirror is not None else 0
        capture = self.capture
        scratch = self.tx_scratch
        replies: list[bytes] = []
        while True:
            vq.disable_kicks()
            now = time.monotonic()
            count = 0
            nbytes = 0
            mirrored = 0
            mirrored_bytes = 0     # only frames written to RX count as received, not the batch's bytes
            while count < BATCH:
                popped = vq.pop_frame(hdr_len, scratch)
                if popped is None:
                    break
                head, frame, vnet_flags = popped
                count += 1
                nbytes += len(frame)
                if capture is not None and frame:
                    capture.add(frame)
                if not frame:
                    drops[TX_EMPTY_FRAME] += 1
                elif mirror is not None:
                    if mirror.put(frame):
                        mirrored += 1
                        mirrored_bytes += len(frame)
                    elif mirror.too_big != too_big_seen:
                        too_big_seen = mirror.too_big
                        drops[RX_TOO_BIG] += 1
                    else:
                        drops[RX_NO_BUFFERS] += 1
                else:
                    handle_frame(frame, now, replies, partial_ok and bool(vnet_flags & _NEEDS_CSUM))
                vq.push(head, 0)
            counters.tx_frames += count
            counters.tx_bytes += nbytes
            if vq.flush():
                slot.notify()
            if mirrored:
                self.publish_rx(mirrored, mirrored_bytes)
            if replies:
                pending.extend(replies)
                replies.clear()
            # Through the guard so that a bad RX chain breaks the RX ring, not this TX ring.
            self.flush()
            if count >= BATCH:
                return True
            if not vq.enable_kicks():
                return False

    def handle_frames(self, frames: list[tuple[bool, memoryview]]) -> None:
        """Frames other workers handed over (flows this pair owns), as ``(csum_partial, frame)``: handled
        like TX frames."""
        now = time.monotonic()
        replies: list[bytes] = []
        for csum_partial, frame in frames:
            self.handle_frame(frame, now, replies, csum_partial)
        if replies:
            self.queue.extend(replies)
        self.flush()

    # -- RX -----------------------------------------------------------------------

    def flush(self) -> None:
        """Write queued frames into the RX ring, under the RX ring's own guard.

        The TX path calls this after each batch: were :meth:`deliver_rx` called
        directly there, a malformed RX chain would raise inside the TX ring's
        guard and break the TX ring instead of the RX ring.
        """
        if self.queue:
            self.guard(self.rx, self.deliver_rx)

    def publish_rx(self, frames: int, nbytes: int) -> None:
        """Count ``frames`` written into the RX ring outside :meth:`deliver_rx`, publish them and signal
        the guest if it wants it."""
        self.counters.rx_frames += frames
        self.counters.rx_bytes += nbytes
        vq = self.rx.vq
        if vq is not None and vq.flush():
            self.rx.notify()

    def deliver_rx(self) -> None:
        """Write queued frames into the guest's RX buffers, as many as fit."""
        pending = self.queue
        drops = self.counters.drops
        while len(pending) > QUEUE_MAX:
            pending.popleft()
            drops[RX_NO_BUFFERS] += 1
        slot = self.rx
        writer = slot.writer
        vq = slot.vq
        if writer is None or vq is None:
            return
        counters = self.counters
        delivered = 0
        nbytes = 0
        while pending:
            frame = pending[0]
            too_big = writer.too_big
            if not writer.put(frame):
                if writer.too_big != too_big:
                    # Larger than any chain the guest posts: it can never be delivered.
                    pending.popleft()
                    drops[RX_TOO_BIG] += 1
                    continue
                # Out of buffers: ask for a kick when the guest posts more, then look once more
                # (buffers posted before the request took effect would otherwise go unnoticed).
                if not vq.enable_kicks() or not writer.put(frame):
                    break
            pending.popleft()
            delivered += 1
            nbytes += len(frame)
        else:
            vq.disable_kicks()
        counters.rx_frames += delivered
        counters.rx_bytes += nbytes
        if vq.flush():
            slot.notify()

    def drop_pending(self) -> None:
        """Drop every queued frame (the RX ring went away), counting them."""
        self.counters.drops[RX_RING_DOWN] += len(self.queue)
        self.queue.clear()

    @property
    def rx_writer(self) -> RxWriter | None:
        """The running RX ring's writer (None: no RX ring)."""
        return self.rx.writer

    def rx_wait(self) -> bool:
        """Ask for a kick when the guest posts RX buffers; True if some were posted meanwhile."""
        vq = self.rx.vq
        return vq is not None and vq.enable_kicks()

    def rx_broken(self, err: Exception) -> None:
        """The guest broke the RX ring while we wrote in place."""
        self.break_ring(self.rx, err)
