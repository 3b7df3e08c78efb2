"""The worker's packet path: guest TX ring -> protocol endpoint -> guest RX ring.

Theory of operation.  A kick on the TX ring means the guest posted frames.
:func:`service_tx` drains the ring in batches of at most :data:`BATCH`
chains with kicks disabled: each frame is viewed in place in guest memory
(a memoryview, no copy; a frame the guest split over several buffers, as a
Linux TSO frame, is gathered into the worker's ``tx_scratch``, one copy),
handed to the sans-IO
:class:`~shardswitch.net.endpoint.GuestEndpoint`, and its chain is returned
as used.  The used index is published once per batch and the driver is
signalled only when EVENT_IDX says it wants to be.  Kicks are then
re-enabled; if the guest added frames in the meantime (the re-check after
the fence), the loop drains again, so no kick is ever lost.

Checksum offload: when the TX ring negotiated VIRTIO_NET_F_CSUM
(``w.tx_partial_csum``), the flags byte of each chain's virtio-net header is
read beside the frame (by ``pop_frame``) and
NEEDS_CSUM goes to :meth:`Worker.handle_frame` as ``csum_partial``: the L4
parsers then skip verifying that frame's checksum.  Frames from other
workers' hand-overs carry the flag in their prefix byte.

Replies (ARP, DHCP) and everything the flows send go to a bounded
per-worker queue of frames for the RX ring (``w.queue``), which
:func:`deliver_rx` writes into the guest's posted RX buffers (with MRG_RXBUF
a frame may span several).  When the guest has no buffers left, the frames
wait and RX kicks are enabled, so the guest's next buffer refill wakes us;
beyond :data:`~shardswitch.worker.port.QUEUE_MAX` frames the oldest are
dropped and counted.  RX kicks stay disabled otherwise: the guest refills its RX ring
constantly and we do not want a wake-up for each refill.

Everything here is private to the worker process: no lock, no shared state.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from shardswitch.net.drop import DropReason
from shardswitch.virtio.netdev import VnetHdrFlags
from shardswitch.worker.counters import Counters
from shardswitch.worker.port import QUEUE_MAX

if TYPE_CHECKING:
    from shardswitch.worker.worker import Worker

#: Chains taken from the TX ring before the worker looks at its other events.
BATCH = 256
_NEEDS_CSUM = int(VnetHdrFlags.NEEDS_CSUM)
RX_NO_BUFFERS = DropReason.RX_NO_BUFFERS
RX_RING_DOWN = DropReason.RX_RING_DOWN
RX_TOO_BIG = DropReason.RX_TOO_BIG
TX_EMPTY_FRAME = DropReason.TX_EMPTY_FRAME


def service_tx(w: Worker) -> bool:
    """Drain the TX ring; True when a batch limit left frames for another round."""
    slot = w.tx
    vq = slot.vq
    if vq is None:
        return False
    counters = w.counters
    drops = counters.drops
    pending = w.queue
    hdr_len = slot.hdr_len
    partial_ok = w.tx_partial_csum
    # Diagnostic mode: every frame goes straight back into an RX buffer (one copy).
    mirror = w.rx.writer if w.reflect else None
    # RxWriter.put refuses both a frame that only lacks buffers now and one that can never fit
    # (too_big rises): tell them apart like deliver_rx does, or status blames missing buffers
    # for frames the guest's buffers are too small for (seen with testpmd's mrg_rxbuf=0).
    too_big_seen = mirror.too_big if mirror is not None else 0
    capture = w.capture
    scratch = w.tx_scratch
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
                w.handle_frame(frame, now, replies, partial_ok and bool(vnet_flags & _NEEDS_CSUM))
            vq.push(head, 0)
        counters.tx_frames += count
        counters.tx_bytes += nbytes
        if vq.flush():
            slot.notify()
        if mirrored:
            publish_rx(w, mirrored, mirrored_bytes)
        if replies:
            pending.extend(replies)
            replies.clear()
        if pending:
            # Through the worker so that a bad RX chain breaks the RX ring, not this TX ring.
            w.flush()
        if count >= BATCH:
            return True
        if not vq.enable_kicks():
            return False


def service_inbox(w: Worker) -> None:
    """Frames other workers handed over (flows this worker owns): handle them like TX frames."""
    peers = w.peers
    if peers is None:
        return
    frames = peers.receive()
    if not frames:
        return
    now = time.monotonic()
    replies: list[bytes] = []
    for csum_partial, frame in frames:
        w.handle_frame(frame, now, replies, csum_partial)
    if replies:
        w.queue.extend(replies)
    w.flush()


def publish_rx(w: Worker, frames: int, nbytes: int) -> None:
    """Count ``frames`` written into the RX ring outside :func:`deliver_rx`, publish them and signal
    the guest if it wants it."""
    w.counters.rx_frames += frames
    w.counters.rx_bytes += nbytes
    vq = w.rx.vq
    if vq is not None and vq.flush():
        w.rx.notify()


def deliver_rx(w: Worker) -> None:
    """Write queued frames into the guest's RX buffers, as many as fit."""
    pending = w.queue
    drops = w.counters.drops
    while len(pending) > QUEUE_MAX:
        pending.popleft()
        drops[RX_NO_BUFFERS] += 1
    slot = w.rx
    writer = slot.writer
    vq = slot.vq
    if writer is None or vq is None:
        return
    counters = w.counters
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


def drop_pending(pending: deque[bytes], counters: Counters) -> None:
    """Drop every queued frame (the RX ring went away), counting them."""
    counters.drops[RX_RING_DOWN] += len(pending)
    pending.clear()
