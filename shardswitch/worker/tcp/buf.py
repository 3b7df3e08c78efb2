"""Host TCP data to the guest as frames built in our own buffers: passt's tcp_buf.c.

The fallback beside :mod:`shardswitch.worker.tcp.vu`: used when frames
already wait in the worker's queue (writing in place would overtake them),
when the guest does not take DATA_VALID (the TCP checksum is computed here,
over our buffer), and when its RX buffers cannot take headers in place.
Each frame is a buffer of ours (a :class:`~shardswitch.virtio.netdev.GsoFrame`
above one MSS) into which the socket is peeked; the RX writer copies it into
the guest's buffers later.  At most :data:`QUEUE_LIMIT` frames are queued:
beyond that the data stays in the socket until the queue drains.
"""

from __future__ import annotations

from shardswitch.net import tcp
from shardswitch.net.tcp import ACK, PSH
from shardswitch.virtio.netdev import GsoFrame
from shardswitch.worker.port import QUEUE_MAX

from shardswitch.worker.tcp.internal import Frames, TcpCore, TcpFlow

#: Frames queued for the guest beyond which no more host data is read for now.
QUEUE_LIMIT = QUEUE_MAX // 2
_DATA = ACK | PSH


def to_guest(flows: TcpCore, flow: TcpFlow, now: float, out: Frames) -> None:
    """Frames of the flow's host data into ``out``, as far as the window and the queue limit allow."""
    port = flows.port
    conn = flow.conn
    pending = port.queue
    hl = flow.addr.headers_len
    mss = conn.mss
    # A DATA_VALID guest takes data segments unchecked: skip summing them (control segments stay summed).
    csum = not port.offloads.data_valid
    gso, chunk = flows.framing(flow)
    while True:
        queued = len(out) if out is pending else len(out) + len(pending)
        room = flows.room(flow)
        if room <= 0 or queued >= QUEUE_LIMIT:
            return
        n = min(room, chunk)
        buf = GsoFrame(hl + n, 0, mss, hl) if n > mss else bytearray(hl + n)
        view = memoryview(buf)
        try:
            got = flows.peek(flow, [view[hl:]])
        except BlockingIOError:
            view.release()
            flow.readable = False
            return
        except OSError:
            view.release()
            flows.reset_guest(flow, out)
            return
        view.release()
        if got == 0:
            flows.fin_to_guest(flow, now, out)
            return
        if got < n:
            del buf[hl + got:]
        if got > mss and isinstance(buf, GsoFrame):
            buf.gso_type = gso
        tcp.pack_into(buf, flow.addr, conn.seq_to_guest, conn.seq_from_guest, _DATA,
                      conn.wnd_to_guest >> conn.ws_to_guest, csum=csum)
        flows.sent(flow, got, now)
        out.append(tcp.as_frame(buf))
