"""A TCP socket's state out of one kernel and into another: passt's repair-mode dump and restore.

Theory of operation.  A socket in repair mode (TCP_REPAIR, set by the
privileged helper of :mod:`shardswitch.migration.repair`) sends nothing and
lets its owner read and write what is normally the kernel's: the sequence
numbers of each queue (TCP_QUEUE_SEQ after selecting the queue with
TCP_REPAIR_QUEUE), the window state (TCP_REPAIR_WINDOW), the options
negotiated at the handshake (TCP_REPAIR_OPTIONS) and the queues' contents.

:func:`dump` reads all of that from an established socket (queues are
peeked, so a failed migration loses nothing); closing the socket afterwards
sends nothing.  :func:`restore` rebuilds the connection on a new socket:
bound to the same local address and port, sequence numbers set, connected
(in repair mode connect() sends no SYN: the socket is established at once),
the receive queue and the sent part of the send queue written back, options
and window set.  Once repair mode is off again (:func:`finish`), the part of
the send queue the peer had not been sent yet is sent normally.

Established connections move, and those the guest half-closed (our socket
sent its FIN: FIN_WAIT1 or FIN_WAIT2): the FIN is not data, so the dump
leaves it out of the queues' counts, and the restore shuts the new socket
down as passt does: in repair mode for FIN_WAIT2 (the peer has the FIN: the
socket only changes state), after it for FIN_WAIT1 (the FIN goes out again,
at the same sequence number, after whatever data is still queued).  A
connection whose peer sent its FIN (CLOSE_WAIT and later) is reset instead:
the peer will not send its FIN again.

**Freezing.**  A socket in repair mode still takes data and acknowledges it:
a segment arriving after the dump would be acknowledged by the source and
never reach the target.  So before repair mode the source freezes each
connection (:func:`shardswitch.migration.repair.freeze`: a socket filter
that drops every segment), and the peer sends again what it sees
unacknowledged, to the target.

**The gap** (source and target in one network namespace).  Between the
source closing a dumped socket and the target connecting its new one, a
segment from the peer would find no socket and the kernel would answer it
with a RST.  A guard closes that gap: a listening socket on the same local
address and port (:func:`guard`: SO_REUSEADDR and SO_REUSEPORT, set on the
dumped socket too), frozen like the connection, so that what reaches the
port is dropped silently.  The guard does not stop the target's socket,
which binds in repair mode and whose connect() only refuses a second
socket of the same four addresses.  Connections a host client opened to a
forwarded port get none: their local port is the forwarding listener's.

Sizes are bounded
(:data:`~shardswitch.migration.format.MAX_QUEUE`): a larger queue resets its
connection rather than making the state unbounded.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from enum import IntEnum

from shardswitch.migration.format import MAX_QUEUE, Side, TcpSocketState
from shardswitch.net import inany

#: Socket options of linux/tcp.h not in Python's socket module.
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
SO_PEEK_OFF = 42
#: SIOCOUTQ (= TIOCOUTQ), SIOCOUTQNSD, SIOCINQ (= FIONREAD).
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B
SIOCINQ = 0x541B
#: TCP_INFO: tcpi_state, ca_state, retransmits, probes, backoff, options, snd/rcv wscale nibbles.
TCP_INFO_HEAD = struct.Struct("BBBBBBB")
#: struct tcp_repair_window: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
REPAIR_WINDOW = struct.Struct("IIIII")
#: struct tcp_repair_opt: code, value.
REPAIR_OPT = struct.Struct("II")
_INT = struct.Struct("i")
_MOD = 1 << 32
#: Smallest chunk a queue is written back in when the kernel refuses larger ones.
RESTORE_CHUNK_MIN = 1024
#: How long the data not sent yet may take to fit in the new socket's send buffer.
FINISH_TIMEOUT = 2.0


class RepairQueue(IntEnum):
    """TCP_REPAIR_QUEUE values."""

    RECV = 1
    SEND = 2


class TcpState(IntEnum):
    """The kernel's TCP states that matter here (tcp_states.h)."""

    ESTABLISHED = 1
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5


#: The states a socket may move in.
MOVABLE_STATES = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT1, TcpState.FIN_WAIT2})


class TcpiOpt(IntEnum):
    """TCP_INFO's tcpi_options bits."""

    TIMESTAMPS = 1
    SACK = 2


class TcpOptCode(IntEnum):
    """TCP option kinds set with TCP_REPAIR_OPTIONS."""

    MAXSEG = 2
    WINDOW = 3
    SACK_PERMITTED = 4
    TIMESTAMP = 8


class MigrateError(Exception):
    """A socket could not be dumped or restored (its connection is reset instead)."""


def _ioctl_int(sock: socket.socket, request: int) -> int:
    """An ioctl returning an int."""
    return int(_INT.unpack(fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])


def _u32(value: int) -> bytes:
    """An unsigned 32-bit option value as the kernel reads it (setsockopt() of an int would overflow)."""
    return value.to_bytes(4, "little")


def _select(sock: socket.socket, queue: RepairQueue) -> None:
    """Select the queue the next TCP_QUEUE_SEQ, send or peek works on."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, int(queue))


def _peek(sock: socket.socket, length: int) -> bytes:
    """The first ``length`` bytes of the selected queue, without removing them."""
    if not length:
        return b""
    try:
        data = sock.recv(length, socket.MSG_PEEK)
    except BlockingIOError:
        data = b""
    if len(data) != length:
        raise MigrateError(f"short read of a queue: {len(data)} of {length} bytes")
    return data


def dump(sock: socket.socket) -> TcpSocketState:
    """The state of an established (or FIN_WAIT) socket in repair mode; MigrateError when it cannot move."""
    try:
        return _dump(sock)
    except OSError as err:
        raise MigrateError(f"dump: {err.strerror or err}") from None


def _dump(sock: socket.socket) -> TcpSocketState:
    """:func:`dump` without the error translation."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    state, _ca, _retrans, _probes, _backoff, options, scales = TCP_INFO_HEAD.unpack_from(info)
    if state not in MOVABLE_STATES:
        raise MigrateError(f"socket in TCP state {state}, not established")
    mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    timestamp = sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF \
        if options & TcpiOpt.TIMESTAMPS else 0
    window = REPAIR_WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, REPAIR_WINDOW.size))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)      # peeks from the start of the queues
    except OSError:
        pass
    _select(sock, RepairQueue.SEND)
    sndq = _ioctl_int(sock, SIOCOUTQ)
    notsent = _ioctl_int(sock, SIOCOUTQNSD)
    if not 0 <= notsent <= sndq or sndq > MAX_QUEUE:
        raise MigrateError(f"send queue of {sndq} bytes ({notsent} not sent) cannot move")
    # In FIN_WAIT1 our FIN is not acknowledged yet: it counts in the queue's sequence space (and in the part
    # not sent, while it is not), but it is no data byte.
    # In FIN_WAIT2 it is acknowledged, and the queue empty, but the sequence counts it: the restored queue
    # starts at the FIN, which the restore replays in repair mode.
    fin_queued = int(state == TcpState.FIN_WAIT1 and sndq > 0)
    send_queue = _peek(sock, sndq - fin_queued)
    if notsent and fin_queued:
        notsent -= 1
    seq_snd = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    _select(sock, RepairQueue.RECV)
    rcvq = _ioctl_int(sock, SIOCINQ)
    if not 0 <= rcvq <= MAX_QUEUE:
        raise MigrateError(f"receive queue of {rcvq} bytes cannot move")
    recv_queue = _peek(sock, rcvq)
    seq_rcv = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup = window
    return TcpSocketState(
        tcpi_state=state, tcpi_options=options, snd_ws=scales & 0x0F, rcv_ws=scales >> 4, mss=mss,
        timestamp=timestamp, seq_snd=(seq_snd - sndq - (state == TcpState.FIN_WAIT2)) % _MOD,
        seq_rcv=(seq_rcv - rcvq) % _MOD,
        snd_wl1=snd_wl1, snd_wnd=snd_wnd, max_window=max_window, rcv_wnd=rcv_wnd, rcv_wup=rcv_wup,
        send_queue=send_queue, not_sent=notsent, recv_queue=recv_queue)


def new_socket(host: Side) -> socket.socket:
    """The socket a connection with host side ``host`` is restored on (to be put in repair mode next)."""
    family = socket.AF_INET if inany.is_v4(host.our_addr) else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def guard(sock: socket.socket) -> socket.socket:
    """A listening socket on ``sock``'s local address and port, to be frozen before ``sock`` closes (see the
    module's docstring); OSError when it cannot be made."""
    for reuse in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
        sock.setsockopt(socket.SOL_SOCKET, reuse, 1)
    local = sock.getsockname()
    guarding = socket.socket(sock.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        for reuse in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
            guarding.setsockopt(socket.SOL_SOCKET, reuse, 1)
        guarding.bind(local)
        guarding.listen(1)
    except OSError:
        guarding.close()
        raise
    return guarding


def restore(sock: socket.socket, host: Side, st: TcpSocketState) -> None:
    """Rebuild the connection on ``sock`` (in repair mode); MigrateError when the kernel refuses."""
    try:
        _restore(sock, host, st)
    except OSError as err:
        raise MigrateError(f"restore: {err.strerror or err}") from None


def _restore(sock: socket.socket, host: Side, st: TcpSocketState) -> None:
    """:func:`restore` without the error translation."""
    sock.bind(inany.sockaddr(host.our_addr, host.our_port))
    if st.tcpi_options & TcpiOpt.TIMESTAMPS:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, _u32(st.timestamp))
    _select(sock, RepairQueue.SEND)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, _u32(st.seq_snd))
    _select(sock, RepairQueue.RECV)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, _u32(st.seq_rcv))
    err = sock.connect_ex(inany.sockaddr(host.ep_addr, host.ep_port))
    if err:
        raise OSError(err, f"connect: {errno.errorcode.get(err, err)}")
    _write_queue(sock, st.recv_queue)
    _select(sock, RepairQueue.SEND)
    _write_queue(sock, st.send_queue[:len(st.send_queue) - st.not_sent])
    opts = [(TcpOptCode.WINDOW, st.snd_ws + (st.rcv_ws << 16)), (TcpOptCode.MAXSEG, st.mss)]
    if st.tcpi_options & TcpiOpt.SACK:
        opts.append((TcpOptCode.SACK_PERMITTED, 0))
    if st.tcpi_options & TcpiOpt.TIMESTAMPS:
        opts.append((TcpOptCode.TIMESTAMP, 0))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, b"".join(REPAIR_OPT.pack(*o) for o in opts))
    if st.tcpi_state == TcpState.FIN_WAIT2:
        sock.shutdown(socket.SHUT_WR)      # in repair mode (options need ESTABLISHED): a state change, no FIN
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                    REPAIR_WINDOW.pack(st.snd_wl1, st.snd_wnd, st.max_window, st.rcv_wnd, st.rcv_wup))


def finish(sock: socket.socket, st: TcpSocketState) -> None:
    """Out of repair mode: send what the peer had not been sent yet, then our FIN again if the peer had not
    acknowledged it; MigrateError when that fails."""
    try:
        if st.not_sent:
            # The new socket's buffer may be smaller than the old one's: wait for room, a little.
            sock.settimeout(FINISH_TIMEOUT)
            try:
                sock.sendall(st.send_queue[len(st.send_queue) - st.not_sent:])
            finally:
                sock.setblocking(False)
        if st.tcpi_state == TcpState.FIN_WAIT1:
            sock.shutdown(socket.SHUT_WR)
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    except OSError as err:
        raise MigrateError(f"after repair: {err.strerror or err}") from None


def _write_queue(sock: socket.socket, data: bytes) -> None:
    """Write ``data`` to the selected queue, in smaller chunks when the kernel is short of memory."""
    view = memoryview(data)
    chunk = len(view)
    while view:
        try:
            sent = sock.send(view[:chunk])
        except OSError as err:
            if err.errno in (errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN) and chunk > RESTORE_CHUNK_MIN:
                chunk //= 2
                continue
            raise
        view = view[sent:]
