"""TCP connections of one worker: the socket side of passt's tcp.c.

Theory of operation.  A guest SYN becomes a non-blocking ``connect()`` of a
host socket (to the host's loopback when the guest addressed a mapped
address); the socket is watched edge-triggered.  When the connect completes
the guest gets its SYN-ACK (our MSS from the MTU, window scale when the
guest offered it); when it fails, a RST, so the guest's client fails at once.

From then on no data is buffered here (see :mod:`shardswitch.net.tcp` for
the sequence bookkeeping): guest payload is ``send()``-ed and ACKed as far
as the socket took it; host data is peeked (``SO_PEEK_OFF`` keeps the peek
offset at the first byte not yet sent to the guest), within the guest's
window, straight into the guest's RX buffers (:mod:`~shardswitch.worker.tcp.vu`)
or, when that cannot be, into frames of ours (:mod:`~shardswitch.worker.tcp.buf`),
and discarded with ``MSG_TRUNC`` once ACKed.  A FIN either way is a
half-close (``shutdown(SHUT_WR)`` / a FIN to the guest after end of
stream); a RST either way closes the socket (with a zero linger so the host
peer sees a reset too).  The flow is removed when both FINs are done.

The window offered to the guest is what the host socket can take onward
(:mod:`~shardswitch.worker.tcp.window`, passt's logic): for a host-local
peer its receive window (``TCP_INFO``), else that and the room in the send
buffer; read on every control segment, before data frames only while it is
small.  A zero window is watched (EPOLLOUT, the timers, the guest's window
probes, answered at once) until it opens.  The MSS of the guest's SYN goes
on the host socket (``TCP_MAXSEG``) before ``connect()``, as passt does.

Work caused by guest segments is done once per batch: a segment from the
guest only marks its flow as due, and the first mark asks the worker to call
:meth:`TcpFlows.flush_due` once the current batch of guest frames is handled
(``port.defer``: at the end of the loop's round, no system call).  Then each due flow discards everything the
batch ACKed in one ``MSG_TRUNC`` read (``unconsumed``: ACKed bytes still in
the socket, which the peek offset accounts for), sends the host data the
window now allows, and ACKs the guest's data unless a data frame already
did.  Segments out of order, duplicates of our FIN and the like are
answered at once.

Checksum offload: a guest segment whose virtio-net header had NEEDS_CSUM
(``csum_partial`` of its IP packet; with HOST_TSO4/6 up to 64 KiB, still
sent to the socket in one ``send()``) is not checksum-verified, and data
segments to a guest that negotiated GUEST_CSUM (``offloads.data_valid``) are
built without their TCP checksum; small control segments keep theirs.  A
guest that negotiated GUEST_TSO4/6 (``offloads.tso4`` / ``tso6``) gets host data in
frames of up to 64 KiB whatever its MTU (GSO frames: the guest splits them
at the connection's MSS), so the per-frame cost is paid once per 64 KiB
rather than once per MSS.

Timers (:mod:`~shardswitch.worker.tcp.timers`) run once a second over this
worker's own flows: retransmission, SYN timeout, keepalive, inactivity.
The life of a flow - the shared table (type TCP, guest side and host side),
the local index, hand-over of a segment of a flow another worker owns, the
once-a-second pass - is the flow layer's (:mod:`shardswitch.worker.flow`);
where a connection goes on the host is
:class:`~shardswitch.worker.fwd.Forwarding`'s.  :class:`TcpFlows` plugs in
its hooks.  Connections that host clients open to forwarded
ports (``-t``) are accepted by :mod:`shardswitch.worker.tcp.forward` and
adopted here (:meth:`TcpFlows.adopt_client`): our SYN goes to the guest
first, the rest is the same.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import select
import socket
import time

from shardswitch.ipc import PortFd
from shardswitch.net import inany, tcp
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.endpoint import GuestEndpoint
from shardswitch.net.inany import InAny
from shardswitch.net.ipv4 import IpProto, Ipv4Packet
from shardswitch.net.ipv6 import Ipv6Packet, NextHeader
from shardswitch.net.tcp import (
    ACK,
    CONNECTING,
    ESTABLISHED,
    FIN,
    FIN_SENT,
    GUEST_FIN_RCVD,
    PSH,
    RST,
    SOCK_FIN_RCVD,
    SYN,
    SYN_SENT,
    Addressing,
    TcpConn,
    TcpSegment,
)
from shardswitch.shm.layout import FlowRef, FlowSide, FlowType, Pif
from shardswitch.virtio.netdev import GsoType
from shardswitch.worker.flow import FlowLayer, NewFlow
from shardswitch.worker.port import WorkerPort
from shardswitch.worker.sockpool import SocketPool
from shardswitch.worker.tcp import buf as tcp_buf
from shardswitch.worker.tcp import timers as tcp_timers
from shardswitch.worker.tcp import vu as tcp_vu
from shardswitch.worker.tcp.forward import LINGER_RESET, TcpForwarder
from shardswitch.worker.tcp.internal import Frames, TcpFlow
from shardswitch.worker.tcp.tcpinfo import WINDOW_DEFAULT, host_mss
from shardswitch.worker.tcp.timers import RTO_INIT
from shardswitch.worker.tcp.window import HostWindow

log = logging.getLogger("shardswitch.worker")

#: SO_PEEK_OFF (not in Python's socket module).
SO_PEEK_OFF = 42
#: Discard area for MSG_TRUNC reads and for peeks without SO_PEEK_OFF (never touched by the former).
DISCARD_SIZE = 1 << 24
EDGE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
EDGE_OUT = EDGE | select.EPOLLOUT
_DATA = ACK | PSH
#: tcpi_state (the first byte of TCP_INFO) of a socket its peer reset: TCP_CLOSE.
TCPI_STATE_CLOSE = 7


def _was_reset(sock: socket.socket) -> bool:
    """Whether ``sock``, whose read saw an end of stream with our side open, was reset rather than closed
    (a FIN leaves it in CLOSE_WAIT)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCPI_STATE_CLOSE
    except OSError:
        return True


class TcpFlows:
    """Every TCP connection of one worker: the flow layer's hooks for TCP."""

    table_full = DropReason.TCP_TABLE_FULL
    conflict = DropReason.TCP_IGNORED

    def __init__(self, port: WorkerPort, layer: FlowLayer, listeners: tuple[PortFd, ...] = ()) -> None:
        """Serve TCP for ``port``'s worker through ``layer``; ``listeners``: its sockets of -t ports."""
        self.port = port
        self.layer = layer
        #: Pre-opened sockets for the guest's new connections (refilled by the deferred handler).
        self.pool = SocketPool()
        self.pool.refill()
        self.mtu = port.params.mtu
        #: Flows with work left for the end of the current batch of guest frames (ACK, consume, send).
        self.due: dict[int, TcpFlow] = {}
        #: Flows that stopped writing in place for lack of RX buffers (resumed on the guest's refill).
        self.rx_blocked: dict[int, TcpFlow] = {}
        self.discard = memoryview(mmap.mmap(-1, DISCARD_SIZE))
        #: The windows offered to the guest, from the host sockets (TCP_INFO).
        self.host_window = HostWindow()
        #: flush_due is asked for (port.defer) and has not run yet.
        self.wake_armed = False
        layer.register((FlowType.TCP,), self)
        self.forwarder = TcpForwarder(self, listeners)

    def plug_into(self, endpoint: GuestEndpoint) -> None:
        """Route the guest's TCP segments (IPv4 and IPv6) here."""
        endpoint.register_ip_protocol(IpProto.TCP, self.handle4)
        endpoint.register_ip6_protocol(NextHeader.TCP, self.handle6)

    # -- from the guest ------------------------------------------------------

    def handle4(self, eth_src: bytes, packet: Ipv4Packet, now: float, out: Frames) -> None:
        """A TCP segment from the guest over IPv4 (endpoint handler)."""
        seg = tcp.parse4(packet, not packet.csum_partial)
        self._segment(inany.from_v4(packet.src), inany.from_v4(packet.dst), seg, now, out)

    def handle6(self, eth_src: bytes, packet: Ipv6Packet, now: float, out: Frames) -> None:
        """A TCP segment from the guest over IPv6 (endpoint handler)."""
        self._segment(packet.src, packet.dst, tcp.parse6(packet, not packet.csum_partial), now, out)

    def _segment(self, src: InAny, dst: InAny, seg: TcpSegment, now: float, out: Frames) -> None:
        """Find the segment's flow (or its owner, or create it) and process the segment; a new connection
        the flow policy refuses gets a RST."""
        guest_side = FlowSide(Pif.GUEST, src, seg.src_port, dst, seg.dst_port)
        flags = seg.flags
        try:
            found = self.layer.find(FlowType.TCP, guest_side)
        except PacketError:
            if not flags & RST:
                out.append(self._reset_for(self._addressing(src, dst, seg), seg))
            raise
        if not isinstance(found, NewFlow):
            assert isinstance(found, TcpFlow)
            self._from_guest(found, seg, now, out)
            return
        if flags & RST:
            raise PacketError(DropReason.TCP_IGNORED, "RST without a flow")
        addr = self._addressing(src, dst, seg)
        if flags & SYN and not flags & ACK:
            self._connect(found, addr, seg, now, out)
            return
        out.append(self._reset_for(addr, seg))
        raise PacketError(DropReason.TCP_IGNORED, "no flow: reset")

    def _addressing(self, src: InAny, dst: InAny, seg: TcpSegment) -> Addressing:
        """Frame addressing back to the guest for a segment ``src`` -> ``dst``."""
        port = self.port
        return Addressing.between(port.guest_mac or b"\xff" * 6, port.params.our_mac, dst, src, seg.dst_port,
                                  seg.src_port)

    @staticmethod
    def _reset_for(addr: Addressing, seg: TcpSegment) -> bytes:
        """The RST answering a segment without a connection (RFC 9293 3.10.7.1)."""
        if seg.flags & ACK:
            return tcp.build(addr, seg.ack, 0, RST, 0)
        length = len(seg.payload) + (1 if seg.flags & SYN else 0) + (1 if seg.flags & FIN else 0)
        return tcp.build(addr, 0, tcp.seq_add(seg.seq, length), RST | ACK, 0)

    def _connect(self, new: NewFlow, addr: Addressing, seg: TcpSegment, now: float, out: Frames) -> None:
        """A new connection from the guest: connect() a socket to the policy's target, enter the flow; RST
        when that fails."""
        target, port = new.target, new.port
        sock, host_local = self._local_target(self.pool.take(inany.family(target)), target, port)
        # The guest's MSS for the host peer's segments too (passt; the kernel's EINVAL is never asked for).
        mss = host_mss(seg.mss, addr.v6)
        if mss is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
            except OSError:
                pass
        err = self.layer.fwd.connect(sock, target, port)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            out.append(self._reset_for(addr, seg))
            log.debug("TCP to %s port %d: %s", inany.to_str(target), port, os.strerror(err))
            return
        try:
            local = sock.getsockname()
            ref = self.layer.enter(FlowType.TCP, new.guest_side,
                                   FlowSide(Pif.HOST, target, port, inany.from_str(local[0]), local[1]), now)
        except OSError:
            sock.close()
            raise PacketError(DropReason.TCP_SOCKET_ERROR) from None
        except PacketError:
            sock.close()
            out.append(self._reset_for(addr, seg))
            raise
        except BaseException:
            sock.close()
            raise
        isn = secrets.randbits(32)
        our_mss = tcp.mss_for(self.mtu, addr.v6)
        conn = TcpConn.from_syn(seg, isn, our_mss)
        flow = TcpFlow(ref=ref, ftype=FlowType.TCP, key=new.key, last=now, sock=sock, conn=conn, addr=addr,
                       isn=isn, our_mss=our_mss, timer=now, created=now, local=host_local)
        self.layer.add(flow, sock.fileno(), EDGE_OUT)
        if err == 0:
            self._connected(flow, now, out)

    def _local_target(self, sock: socket.socket, target: InAny, port: int) -> tuple[socket.socket, bool]:
        """(the socket to connect, whether ``target`` is this host: passt's LOCAL test).

        A loopback target is local without asking.  Otherwise, as passt, ``bind()`` to the target: it fails
        (EADDRINUSE and the like) for an address of this host whose port is taken, with EADDRNOTAVAIL
        (or EACCES, EINVAL) for others; one that worked proves nothing and leaves the socket bound there,
        so a fresh socket replaces it.
        """
        if inany.is_loopback(target):
            return sock, True
        try:
            sock.bind(inany.sockaddr(target, port))
        except OSError as err:
            return sock, err.errno not in (errno.EADDRNOTAVAIL, errno.EACCES, errno.EINVAL)
        sock.close()
        return self.pool.take(inany.family(target)), False

    def _set_events(self, flow: TcpFlow, mask: int) -> None:
        """Change the epoll events of a flow's socket."""
        self.port.modify(flow.fd, mask)

    def _connected(self, flow: TcpFlow, now: float, out: Frames) -> None:
        """connect() completed: SYN-ACK to the guest."""
        conn = flow.conn
        conn.flags = (conn.flags & ~CONNECTING) | SYN_SENT
        try:
            flow.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError:
            flow.peek_off = False
        self._set_events(flow, EDGE)
        flow.timer = now
        # Data may have come with the connection: it is peeked once the guest ACKs our SYN.
        flow.readable = True
        out.append(self.syn_ack(flow))

    def syn_ack(self, flow: TcpFlow) -> bytes:
        """Our SYN-ACK for the flow's guest SYN."""
        conn = flow.conn
        # Our window scale only when the guest offered scaling (from_syn left ws_to_guest 0 otherwise).
        options = tcp.syn_options(flow.our_mss, conn.ws_to_guest if conn.ws_to_guest else None)
        # The window of a SYN is never scaled (RFC 7323).
        window = min(self.space(flow), 0xFFFF)
        conn.wnd_to_guest = window
        return tcp.build(flow.addr, flow.isn, conn.seq_from_guest, SYN | ACK, window,
                         options)

    def _from_guest(self, flow: TcpFlow, seg: TcpSegment, now: float, out: Frames) -> None:
        """A segment of a known flow."""
        conn = flow.conn
        flags = seg.flags
        flow.last = now
        if flags & RST:
            self._close(flow, reset_host=True)
            return
        if flow.inbound and not conn.flags & ESTABLISHED:
            self._guest_syn_ack(flow, seg, now, out)
            return
        if flags & SYN:
            if conn.flags & SYN_SENT and not conn.flags & ESTABLISHED:
                out.append(self.syn_ack(flow))
            return
        if conn.flags & CONNECTING or not flags & ACK:
            return
        before = conn.seq_to_guest
        released = conn.on_ack(seg.ack, seg.window, not len(seg.payload) and not flags & FIN)
        if conn.seq_to_guest != before:
            self.rewind_socket(flow)
        if released:
            # Discarded from the socket once per batch (flush_due): one syscall for many ACKs.
            flow.unconsumed += released
            self._later(flow)
        if released or conn.seq_ack_from_guest == conn.seq_to_guest:
            flow.timer = now
            flow.retries = 0
            flow.rto = RTO_INIT
        if len(seg.payload) or flags & FIN:
            if not self._guest_data(flow, seg, out):
                return
        elif seg.seq != conn.seq_from_guest and tcp.seq_lt(seg.seq, conn.seq_from_guest):
            # A keepalive or a zero-window probe (an old sequence number): our ACK and window now (passt).
            out.append(self.ack(flow))
        if conn.done():
            self._close(flow)
            return
        if flow.readable:
            self._later(flow)

    def _guest_syn_ack(self, flow: TcpFlow, seg: TcpSegment, now: float, out: Frames) -> None:
        """The guest's answer to our SYN (a forwarded connection): established, or refused."""
        if not seg.flags & SYN or not seg.flags & ACK or not flow.conn.on_syn_ack(seg):
            return
        flow.timer = now
        flow.retries = 0
        flow.rto = RTO_INIT
        flow.readable = True
        out.append(self.ack(flow))
        self._later(flow)

    def _guest_data(self, flow: TcpFlow, seg: TcpSegment, out: Frames) -> bool:
        """Payload and FIN from the guest: send what is new, ACK what the socket took; False if closed."""
        conn = flow.conn
        payload = seg.payload
        length = len(payload)
        if conn.flags & GUEST_FIN_RCVD:
            out.append(self.ack(flow))
            return True
        skip = conn.new_data(seg.seq, length)
        if skip is None:
            # A gap: we keep nothing out of order; a duplicate ACK asks for the missing part.
            out.append(self.ack(flow))
            return True
        sent = 0
        if skip < length:
            try:
                sent = flow.sock.send(payload[skip:])
            except BlockingIOError:
                sent = 0
            except OSError:
                self.reset_guest(flow, out)
                return False
            conn.seq_from_guest = tcp.seq_add(conn.seq_from_guest, sent)
        if skip + sent < length:
            if not flow.out_wait:
                flow.out_wait = True
                self._set_events(flow, EDGE_OUT)
        elif seg.flags & FIN:
            try:
                flow.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.flags |= GUEST_FIN_RCVD
            conn.seq_from_guest = tcp.seq_add(conn.seq_from_guest, 1)
            out.append(self.ack(flow))
            return True
        elif skip == length and length:
            # All old (a retransmission): say again where we are.
            out.append(self.ack(flow))
            return True
        self._later(flow)
        return True

    # -- ACKs ---------------------------------------------------------------------

    def space(self, flow: TcpFlow) -> int:
        """The window to offer on a control segment, read from the host socket now (TCP_INFO: the peer's
        window, and for a peer that is not local the room in the send buffer)."""
        return self.host_window.for_segment(flow)

    def ack(self, flow: TcpFlow) -> bytes:
        """A pure ACK with the current sequence numbers and window; a zero window arms EPOLLOUT (the send
        buffer's room comes back with it) until it opens (see :meth:`window_update`)."""
        return self._ack(flow, self.space(flow))

    def _ack(self, flow: TcpFlow, space: int) -> bytes:
        """A pure ACK offering ``space`` bytes of window (see :meth:`ack`)."""
        conn = flow.conn
        conn.seq_ack_to_guest = conn.seq_from_guest
        field = conn.window_field(space)
        if not field:
            self._window_closed(flow)
        return tcp.build(flow.addr, conn.seq_to_guest, conn.seq_from_guest, ACK, field)

    def _window_closed(self, flow: TcpFlow) -> None:
        """We offer the guest no window: watch for write space, which may open it (the timers check once a
        second, a guest's window probe is answered at once)."""
        if not flow.out_wait and not flow.conn.flags & GUEST_FIN_RCVD:
            flow.out_wait = True
            self._set_events(flow, EDGE_OUT)

    def window_update(self, flow: TcpFlow, out: Frames) -> None:
        """The window read again from the host socket: an ACK into ``out`` when it is open (EPOLLOUT then
        disarmed), or when the guest is owed one anyway (passt's ACK_IF_NEEDED)."""
        conn = flow.conn
        space = self.space(flow)
        opened = space >> conn.ws_to_guest > 0
        if not opened and conn.seq_ack_to_guest == conn.seq_from_guest:
            conn.wnd_to_guest = 0
            return
        out.append(self._ack(flow, space))
        if opened and flow.out_wait:
            flow.out_wait = False
            self._set_events(flow, EDGE)

    def _later(self, flow: TcpFlow) -> None:
        """Mark the flow as due: once the current batch of guest frames is handled it discards what the
        guest ACKed, sends host data the window allows and ACKs the guest if no data frame did."""
        self.due[flow.fd] = flow
        if not self.wake_armed:
            self.wake_armed = True
            self.port.defer(self.flush_due)

    def flush_due(self) -> None:
        """The batch is over: for each flow due, one discard, data within the window, and an ACK if
        still owed."""
        self.wake_armed = False
        due = list(self.due.values())
        self.due.clear()
        pending = self.port.queue
        now = time.monotonic()
        for flow in due:
            if not flow.closed:
                self.layer.guard(flow, self._flush_one, flow, now, pending)
        if pending:
            self.port.flush()

    def _flush_one(self, flow: TcpFlow, now: float, pending: Frames) -> None:
        """One due flow at the end of a batch: discard what the guest ACKed, send what its window allows,
        ACK its data if no data frame did."""
        if flow.unconsumed:
            self.consume(flow)
        if flow.readable:
            self.to_guest(flow, now, pending)
        # A data frame to the guest may have carried this ACK already.
        if not flow.closed and flow.conn.seq_ack_to_guest != flow.conn.seq_from_guest:
            pending.append(self.ack(flow))

    # -- from the host ------------------------------------------------------------

    def on_socket(self, flow: TcpFlow) -> None:
        """A flow's socket is readable, writable or in error (edge-triggered): flow layer hook."""
        now = time.monotonic()
        pending = self.port.queue
        conn = flow.conn
        if conn.flags & CONNECTING:
            err = flow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                log.debug("TCP connect to port %d: %s", flow.addr.src_port, os.strerror(err))
                self.reset_guest(flow, pending, syn=True)
            else:
                self._connected(flow, now, pending)
        else:
            if flow.out_wait:
                self.window_update(flow, pending)
            flow.readable = True
            self.to_guest(flow, now, pending)
        if pending:
            self.port.flush()

    def peek(self, flow: TcpFlow, views: list[memoryview]) -> int:
        """Peek host data at the flow's offset into ``views``; raises BlockingIOError when none."""
        if flow.peek_off:
            if len(views) == 1:
                return flow.sock.recv_into(views[0], len(views[0]), socket.MSG_PEEK)
            return flow.sock.recvmsg_into(views, 0, socket.MSG_PEEK)[0]
        offset = flow.unconsumed + flow.conn.in_flight()
        got = flow.sock.recvmsg_into([self.discard[:offset], *views], 0, socket.MSG_PEEK)[0]
        if got and got <= offset:
            raise BlockingIOError
        return max(got - offset, 0)

    def room(self, flow: TcpFlow) -> int:
        """Bytes of host data the guest may be sent now (its window; the discard area without SO_PEEK_OFF)."""
        room = flow.conn.sendable()
        if not flow.peek_off:
            room = min(room, DISCARD_SIZE - flow.unconsumed - flow.conn.in_flight())
        return room

    def framing(self, flow: TcpFlow) -> tuple[int, int]:
        """(gso type, payload bytes per frame) for the flow's data frames to the guest.

        A GUEST_TSO guest takes up to 64 KiB in one frame, which it splits into
        MSS-sized segments itself: whole segments only (as a sender's TSO), so no
        runt segment ends each frame.  Others get one MSS per frame.
        """
        offloads = self.port.offloads
        v6 = flow.addr.v6
        mss = flow.conn.mss
        if offloads.tso6 if v6 else offloads.tso4:
            return (GsoType.TCPV6 if v6 else GsoType.TCPV4), max(tcp.max_payload(v6) // mss, 1) * mss
        return 0, mss

    def sent(self, flow: TcpFlow, count: int, now: float) -> None:
        """``count`` bytes of host data went to the guest (with our ACK): advance the sequence."""
        conn = flow.conn
        if conn.seq_to_guest == conn.seq_ack_from_guest:
            flow.timer = now
        conn.seq_to_guest = tcp.seq_add(conn.seq_to_guest, count)
        conn.seq_ack_to_guest = conn.seq_from_guest

    def fin_to_guest(self, flow: TcpFlow, now: float, out: Frames) -> None:
        """End of stream from the host: our FIN to the guest; a RST if the peer reset the connection (its
        error was taken by another call, so the read saw an end of stream: the guest must not take a cut
        stream for a whole one).  Only while our side is open: once we sent our FIN, the peer's FIN also
        closes the socket (TIME_WAIT moves to a socket of its own)."""
        if not flow.conn.flags & GUEST_FIN_RCVD and _was_reset(flow.sock):
            self.reset_guest(flow, out)
            return
        conn = flow.conn
        flow.readable = False
        conn.flags |= SOCK_FIN_RCVD | FIN_SENT
        if conn.seq_to_guest == conn.seq_ack_from_guest:
            flow.timer = now
        out.append(tcp.build(flow.addr, conn.seq_to_guest, conn.seq_from_guest,
                             FIN | ACK, conn.window_field(self.space(flow))))
        conn.seq_to_guest = tcp.seq_add(conn.seq_to_guest, 1)
        conn.seq_ack_to_guest = conn.seq_from_guest

    def to_guest(self, flow: TcpFlow, now: float, out: Frames) -> None:
        """Host data to the guest, as far as its window (and our queue) allows; FIN at end of stream.

        Written in place into the guest's RX buffers (:mod:`~shardswitch.worker.tcp.vu`) when no
        frame waits before it in the worker's queue and the guest takes DATA_VALID; otherwise built
        as frames (one copy more) and queued.
        """
        conn = flow.conn
        if not conn.flags & ESTABLISHED or conn.flags & FIN_SENT:
            return
        if conn.wnd_to_guest <= WINDOW_DEFAULT and not conn.flags & GUEST_FIN_RCVD:
            # A small window offered: the frames carry it read again (passt: only then, not per frame).
            window = self.host_window.for_data(flow)
            if window is not None and not conn.window_field(window):
                self._window_closed(flow)
        port = self.port
        pending = port.queue
        if out is pending and not pending and port.offloads.data_valid:
            writer = port.rx_writer
            if writer is not None and writer.in_place and tcp_vu.to_guest(self, flow, now, writer):
                return
        tcp_buf.to_guest(self, flow, now, out)

    def on_rx_buffers(self) -> None:
        """The guest posted RX buffers: flows that ran out of them while writing in place go on."""
        blocked = list(self.rx_blocked.values())
        self.rx_blocked.clear()
        now = time.monotonic()
        pending = self.port.queue
        for flow in blocked:
            if not flow.closed and flow.readable:
                self.layer.guard(flow, self.to_guest, flow, now, pending)
        if pending:
            self.port.flush()

    def consume(self, flow: TcpFlow) -> None:
        """Discard the bytes the guest ACKed from the socket (no copy: MSG_TRUNC)."""
        count = flow.unconsumed
        flow.unconsumed = 0
        sock = flow.sock
        discard = self.discard
        while count > 0:
            chunk = min(count, DISCARD_SIZE)
            try:
                got = sock.recv_into(discard[:chunk], chunk, socket.MSG_TRUNC)
            except OSError:
                return
            if got <= 0:
                return
            count -= got
        if not flow.peek_off:
            # Peeking from 0 shows end of stream only once everything before it is consumed.
            flow.readable = True

    def reset_guest(self, flow: TcpFlow, out: Frames, syn: bool = False) -> None:
        """RST to the guest, then close (connect refused, host reset, socket errors)."""
        conn = flow.conn
        if syn:
            frame = tcp.build(flow.addr, 0, conn.seq_from_guest, RST | ACK, 0)
        else:
            frame = tcp.build(flow.addr, conn.seq_to_guest, conn.seq_from_guest, RST | ACK, 0)
        out.append(frame)
        self._close(flow, reset_host=True)

    # -- forwarded ports (-t) --------------------------------------------------------------

    def adopt_client(self, sock: socket.socket, key: bytes, ref: FlowRef, addr: Addressing, now: float) -> None:
        """Take over an accepted host client's connection (port forwarding) and send the guest our SYN."""
        sock.setblocking(False)
        isn = secrets.randbits(32)
        our_mss = tcp.mss_for(self.mtu, addr.v6)
        flow = TcpFlow(ref=ref, ftype=FlowType.TCP, key=key, last=now, sock=sock,
                       conn=TcpConn.for_host_client(isn, our_mss), addr=addr, isn=isn, our_mss=our_mss, timer=now,
                       created=now, inbound=True)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError:
            flow.peek_off = False
        self.layer.add(flow, sock.fileno(), EDGE)
        self.port.queue.append(self.syn(flow))

    def syn(self, flow: TcpFlow) -> bytes:
        """Our SYN to the guest for a forwarded connection (MSS, window scale offered)."""
        window = min(self.space(flow), 0xFFFF)
        flow.conn.wnd_to_guest = window
        return tcp.build(flow.addr, flow.isn, 0, SYN, window, tcp.syn_options(flow.our_mss, tcp.OUR_WS))

    # -- closing and timers: flow layer hooks -------------------------------------------

    def _close(self, flow: TcpFlow, reset_host: bool = False) -> None:
        """Close a flow now (a reset with zero linger when ``reset_host``): through the flow layer."""
        if reset_host and not flow.closed:
            try:
                flow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            except OSError:
                pass
        self.layer.close(flow)

    def release(self, flow: TcpFlow) -> None:
        """The flow layer forgot the flow: drop it from the batch lists, close its socket."""
        self.due.pop(flow.fd, None)
        self.rx_blocked.pop(flow.fd, None)
        flow.sock.close()

    def close(self) -> None:
        """The worker is stopping: every connection's socket set to reset on close, the pool closed."""
        for flow in list(self.layer.flows.values()):
            if isinstance(flow, TcpFlow):
                try:
                    flow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                except OSError:
                    pass
        self.pool.close()

    def abort(self, flow: TcpFlow) -> None:
        """A handler of the flow raised: a RST to the guest (when one can be built) and to the host peer."""
        try:
            self.reset_guest(flow, self.port.queue)
        finally:
            self._close(flow, reset_host=True)

    def timer(self, flow: TcpFlow, now: float) -> bool:
        """Once a second: retransmission, SYN and idle timeouts (they close the flow themselves)."""
        tcp_timers.run(self, flow, now, self.port.queue)
        return False

    def deferred(self, now: float) -> None:
        """Once a second, after the flows: the socket pool refilled."""
        self.pool.refill()

    def rewind_socket(self, flow: TcpFlow) -> None:
        """After a rewind of the sequence: the peek offset back to the guest's ACK, data to send again."""
        flow.readable = True
        if flow.peek_off:
            try:
                # Bytes the guest ACKed may still be in the socket, before the rewound position.
                flow.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, flow.unconsumed)
            except OSError:
                pass

