"""Host TCP data written in place into the guest's RX buffers: passt's tcp_vu.c.

Theory of operation.  The copy path of :mod:`shardswitch.worker.tcp` peeks
host data into a frame buffer of ours, which the RX writer then copies into
the guest's buffers.  Here the copy through our buffer is gone: for each
frame, :meth:`~shardswitch.virtio.netdev.RxWriter.take` pops the RX chains
that can hold it (several with MRG_RXBUF: a Linux guest posts buffers of a
page or so, a 64 KiB GSO frame spans about sixteen), and the Ethernet/IP/TCP
headers are written into a head room in front of the payload once the byte
count is known.  :meth:`~shardswitch.virtio.netdev.RxSpan.commit` then
writes the virtio-net header (gso fields, ``num_buffers``) and pushes the
chains that received bytes; the others go back to the ring.

Batches.  As passt does, one ``recvmsg`` peeks the data of a whole batch of
frames: spans are taken for as much as the window allows (at most
:data:`BATCH_FRAMES` frames and :data:`MAX_VIEWS` buffers, the kernel's
iovec limit), the socket is peeked once straight into all their buffers,
and the bytes it gave are dealt out to the frames in order.  Spans that got
nothing are given back first, last taken first (``unpop`` gives back the
chains popped last), then the others are committed in order: only the last
of them can be partly filled and hold chains it gives back, and those are
then the last popped.  The used index is published and the guest signalled
once per call, after every frame the window allows.  A short read does not
end the call: the next peek must see the end of stream (or EAGAIN), since
an edge-triggered FIN is reported only once.

Only for a guest that takes DATA_VALID (GUEST_CSUM): the TCP checksum of
data in place would need a pass over guest memory.  Only when no frame waits
in the worker's queue: frames must reach the guest in order.  When the guest
has no RX buffer left, RX kicks are enabled and the flow waits in
``rx_blocked`` until the guest's refill (:meth:`TcpFlows.on_rx_buffers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardswitch.net import tcp
from shardswitch.net.tcp import ACK, PSH
from shardswitch.virtio.virtqueue import VirtqueueError

from shardswitch.worker.tcp.internal import TcpCore, TcpFlow

if TYPE_CHECKING:
    from shardswitch.virtio.netdev import RxSpan, RxWriter

_DATA = ACK | PSH
#: Frames whose data one peek fetches, at most.
BATCH_FRAMES = 32
#: Buffers in one peek, at most (the kernel refuses more than UIO_MAXIOV, 1024).
MAX_VIEWS = 1024


def to_guest(flows: TcpCore, flow: TcpFlow, now: float, writer: RxWriter) -> bool:
    """Write the flow's host data in place, as far as the window and the posted buffers allow.

    Returns False, having written nothing, when the ring's buffers turn out
    unsuitable (the caller builds frames instead); True otherwise.  A broken
    RX chain breaks the RX ring.
    """
    port = flows.port
    conn = flow.conn
    addr = flow.addr
    hl = addr.headers_len
    hdr_len = writer.hdr_len
    head_room = hdr_len + hl
    mss = conn.mss
    gso, chunk = flows.framing(flow)
    frames = 0
    nbytes = 0
    done = True
    spans: list[RxSpan] = []
    try:
        while True:
            room = flows.room(flow)
            if room <= 0:
                break
            spans, sizes, views = _take(writer, room, chunk, head_room)
            if not spans:
                if not writer.in_place:
                    done = frames > 0
                    break
                if port.rx_wait():
                    continue            # buffers came meanwhile
                flows.rx_blocked[flow.fd] = flow
                break
            try:
                got = flows.peek(flow, views)
            except BlockingIOError:
                _give_back(spans, 0)
                flow.readable = False
                break
            except OSError:
                _give_back(spans, 0)
                flows.reset_guest(flow, port.queue)
                break
            if got == 0:
                _give_back(spans, 0)
                flows.fin_to_guest(flow, now, port.queue)
                break
            # Spans that got nothing go back first (last taken first); then the others, in order.
            filled = 0
            left = got
            while filled < len(sizes) and left > 0:
                left -= sizes[filled]
                filled += 1
            _give_back(spans, filled)
            left = got
            for span, size in zip(spans[:filled], sizes):
                count = size if size < left else left
                left -= count
                tcp.pack_headers_into(span.head(), hdr_len, addr, tcp.TCP_HLEN + count, conn.seq_to_guest,
                                      conn.seq_from_guest, _DATA, conn.wnd_to_guest >> conn.ws_to_guest)
                span.commit(hl + count, gso if count > mss else 0, mss, hl)
                flows.sent(flow, count, now)
                frames += 1
                nbytes += hl + count
            spans = []
    except VirtqueueError as err:
        port.rx_broken(err)
    if frames:
        port.rx_written(frames, nbytes)
    return done


def _take(writer: RxWriter, room: int, chunk: int, head_room: int) -> tuple[list[RxSpan], list[int], list[memoryview]]:
    """Spans for up to ``room`` bytes of payload in frames of ``chunk``: the spans, the payload each can
    hold, and all their payload buffers in order.  Fewer (or none) when the ring runs short."""
    spans: list[RxSpan] = []
    sizes: list[int] = []
    views: list[memoryview] = []
    while room > 0 and len(spans) < BATCH_FRAMES and len(views) < MAX_VIEWS - 64:
        n = room if room < chunk else chunk
        try:
            span = writer.take(head_room + n, head_room)
        except VirtqueueError:
            _give_back(spans, 0)
            raise
        if span is None:
            break
        size = min(n, span.capacity - head_room)
        part = span.views(head_room, size)
        if len(views) + len(part) > MAX_VIEWS:
            span.cancel()
            break
        spans.append(span)
        sizes.append(size)
        views.extend(part)
        room -= size
        if size < n:
            break                       # the ring ran short: this frame is the last
    return spans, sizes, views


def _give_back(spans: list[RxSpan], keep: int) -> None:
    """Give back the spans from index ``keep`` on, the last taken first."""
    for span in reversed(spans[keep:]):
        span.cancel()
