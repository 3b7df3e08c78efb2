"""Host TCP data written in place into the guest's RX buffers: passt's tcp_vu.c.

Theory of operation.  The copy path of :mod:`shardswitch.worker.tcp` peeks
host data into a frame buffer of ours, which the RX writer then copies into
the guest's buffers.  Here the copy through our buffer is gone: for each
frame, :meth:`~shardswitch.virtio.netdev.RxWriter.take` pops the RX chains
that can hold it (several with MRG_RXBUF: a Linux guest posts buffers of a
page or so, a 64 KiB GSO frame spans about sixteen), the socket is peeked
with ``recvmsg_into`` straight into those buffers past a head room, and the
Ethernet/IP/TCP headers are written into that head room once the byte count
is known.  :meth:`~shardswitch.virtio.netdev.RxSpan.commit` then writes the
virtio-net header (gso fields, ``num_buffers``) and pushes the chains that
received bytes; the others go back to the ring.  The used index is published
and the guest signalled once per call, after every frame the window allows.

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

if TYPE_CHECKING:
    from shardswitch.virtio.netdev import RxWriter
    from shardswitch.worker.tcp import TcpFlow, TcpFlows

_DATA = ACK | PSH


def to_guest(flows: TcpFlows, flow: TcpFlow, now: float, writer: RxWriter) -> bool:
    """Write the flow's host data in place, as far as the window and the posted buffers allow.

    Returns False, having written nothing, when the ring's buffers turn out
    unsuitable (the caller builds frames instead); True otherwise.  A broken
    RX chain breaks the RX ring.
    """
    port = flows.port
    conn = flow.conn
    addr = flow.addr
    hl = addr.headers_len
    head_room = writer.hdr_len + hl
    mss = conn.mss
    gso, chunk = flows.framing(flow)
    frames = 0
    nbytes = 0
    done = True
    try:
        while True:
            room = flows.room(flow)
            if room <= 0:
                break
            n = min(room, chunk)
            span = writer.take(head_room + n, head_room)
            if span is None:
                if not writer.in_place:
                    done = frames > 0
                    break
                if port.rx_wait():
                    continue            # buffers came meanwhile
                flows.rx_blocked[flow.fd] = flow
                break
            try:
                got = flows.peek(flow, span.views(head_room, n))
            except BlockingIOError:
                span.cancel()
                flow.readable = False
                break
            except OSError:
                span.cancel()
                flows.reset_guest(flow, port.queue)
                break
            if got == 0:
                span.cancel()
                flows.fin_to_guest(flow, now, port.queue)
                break
            tcp.pack_headers_into(span.head(), writer.hdr_len, addr, tcp.TCP_HLEN + got, conn.seq_to_guest,
                                  conn.seq_from_guest, _DATA, conn.wnd_to_guest >> conn.ws_to_guest)
            span.commit(hl + got, gso if got > mss else 0, mss, hl)
            flows.sent(flow, got, now)
            frames += 1
            nbytes += hl + got
    except VirtqueueError as err:
        port.rx_broken(err)
    if frames:
        port.rx_written(frames, nbytes)
    return done
