"""The window offered to the guest follows the host socket (TCP_INFO), and the guest's MSS goes on the host socket.

Unit tests of :mod:`shardswitch.worker.tcp.tcpinfo` (the struct tcp_info
layout and its decoding, short structs of older kernels included, the window
arithmetic of passt, the MSS for TCP_MAXSEG), of
:class:`~shardswitch.worker.tcp.window.HostWindow` on real loopback sockets,
and tests through a real switch driven by the Python front-end as a scripted
guest (see ``test_worker_tcp.py``): a server in the test namespace reports
the MSS its peer - the switch's host socket - announced, and a server that
stops reading makes the window offered to the guest close, then open again
once it reads.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.net import tcp
from shardswitch.net.tcp import Addressing, TcpConn
from shardswitch.shm.layout import FlowRef, FlowType
from shardswitch.worker.tcp import TcpFlow
from shardswitch.worker.tcp import tcpinfo
from shardswitch.worker.tcp.tcpinfo import (MAX_WINDOW, TCP_INFO, WINDOW_DEFAULT, LowRttTable, TcpInfoOffset,
                                            clamped_scale, covers, decode, host_mss, offered, scaled_sndbuf,
                                            sndbuf_room, window_from_sndbuf)
from shardswitch.worker.tcp.window import HostWindow
from tests.worker.tcpkit import ACK, FIN, GATEWAY4, GUEST4, GUEST_MAC, OUR_MAC, SYN, GuestTcp, Seg

MSS_PORT, HOLD_PORT, GO_PORT = 7101, 7102, 7103
#: The holding server's receive buffer (the kernel doubles it; the window it offers is about half of that).
HOLD_RCVBUF = 4096
#: Above any window the holding server can offer, below the send buffer room the switch's socket has.
HOLD_WINDOW_BOUND = 8192

#: Servers in the test namespace: the MSS one answers the TCP_MAXSEG of the accepted socket (the MSS its peer
#: announced, less options) and closes; the holding one reads nothing until a client connected to GO_PORT,
#: then everything, and answers the sha256 of it after the end of the stream.
SERVERS = f"""
import hashlib, socket, threading
go = threading.Event()
def listener(port, family=socket.AF_INET, host="127.0.0.1", rcvbuf=0):
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((host, port)); s.listen(16)
    return s
def mss(s):
    while True:
        c, _ = s.accept()
        c.sendall(str(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)).encode()); c.close()
def hold(s):
    while True:
        c, _ = s.accept()
        go.wait()
        h = hashlib.sha256()
        while True:
            d = c.recv(65536)
            if not d: break
            h.update(d)
        c.sendall(h.hexdigest().encode()); c.close()
def starter(s):
    while True:
        c, _ = s.accept(); go.set(); c.close()
for fn, s in ((mss, listener({MSS_PORT})), (mss, listener({MSS_PORT}, socket.AF_INET6, "::1")),
              (hold, listener({HOLD_PORT}, rcvbuf={HOLD_RCVBUF})), (starter, listener({GO_PORT}))):
    threading.Thread(target=fn, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


# -- struct tcp_info ------------------------------------------------------------------------------------


def info_bytes(**fields: int) -> bytes:
    """A whole TCP_INFO answer with the given fields set (the others 0)."""
    return TCP_INFO.pack(*(fields.get(name, 0) for name, _ in tcpinfo.LAYOUT))


def test_layout_matches_the_kernel_abi() -> None:
    """The struct is Linux 6.11's: 248 bytes, the fields read where the kernel puts them."""
    assert TCP_INFO.size == 248
    assert tcpinfo.OFFSETS["snd_wnd"] == TcpInfoOffset.SND_WND == 228
    assert tcpinfo.OFFSETS["min_rtt"] == 148 and tcpinfo.OFFSETS["rtt"] == 68
    assert tcpinfo.OFFSETS["last_data_sent"] == 44 and tcpinfo.OFFSETS["bytes_acked"] == 120
    assert tcpinfo.TCP_INFO_BASE == 104


def test_decode_of_a_real_socket() -> None:
    """The running kernel's TCP_INFO of an established loopback connection decodes to sensible values."""
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        with server:
            raw = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO.size)
    assert len(raw) == TCP_INFO.size          # the kernel's struct is at least as long as ours
    info = decode(raw)
    assert info["state"] == 1                 # TCP_ESTABLISHED
    assert info["snd_wnd"] > 0 and info["snd_mss"] > 0 and 0 < info["rtt"] < 1_000_000


@pytest.mark.parametrize("length", [0, 8, 104, 152, 229, 232, 248, 280])
def test_short_and_long_structs(length: int) -> None:
    """An older kernel's shorter struct has only the fields it returned whole; bytes beyond ours are cut."""
    full = info_bytes(state=1, rtt=500, min_rtt=40, snd_wnd=123456, total_rto_time=9) + b"\xff" * 32
    got = decode(full[:length])
    assert set(got) == {name for name, _ in tcpinfo.LAYOUT if tcpinfo.ENDS[name] <= min(length, 248)}
    assert ("snd_wnd" in got) == covers(length, "snd_wnd") == (length >= 232)
    assert ("min_rtt" in got) == covers(length, "min_rtt") == (length >= 152)
    if "snd_wnd" in got:
        assert got["snd_wnd"] == 123456 and got["rtt"] == 500
    if length >= 248:
        assert got["total_rto_time"] == 9


def test_meminfo_validates_its_length() -> None:
    """SO_MEMINFO's send buffer and queued memory; a short answer is no answer."""
    raw = struct.pack("=9I", *range(100, 109))
    assert tcpinfo.meminfo(raw) == (103, 105)
    assert tcpinfo.meminfo(raw[:23]) is None


# -- the window arithmetic ------------------------------------------------------------------------------


def test_clamped_scale_as_passt() -> None:
    """passt's example (f=150, 10..20, y=15: 1250), and both ends."""
    assert clamped_scale(1000, 15, 10, 20, 150) == 1250
    assert clamped_scale(1000, 5, 10, 20, 75) == 1000
    assert clamped_scale(1000, 25, 10, 20, 75) == 750
    assert clamped_scale(1000, 20, 10, 20, 75) == 750


def test_send_buffer_counted_whole_then_three_quarters() -> None:
    """Up to 128 KiB the buffer counts whole, from 4 MiB on 75%, in 256-byte grains."""
    assert scaled_sndbuf(65536) == 65536
    assert scaled_sndbuf(8 << 20) == 6 << 20
    middle = scaled_sndbuf(2 << 20)
    assert (2 << 20) * 3 // 4 < middle < 2 << 20 and middle % 256 == 0


def test_send_buffer_room() -> None:
    """The room in the send buffer: whole when empty, none when over, in whole segments with the queue's
    overhead, queued bytes against the scaled size without SO_MEMINFO."""
    assert sndbuf_room(0, 1400, 100_000, 0) == 99_840                 # scaled_sndbuf: 256-byte grains
    assert sndbuf_room(0, 1400, 100_000, 100_001) == 0
    assert sndbuf_room(20_000, 1400, 100_000, 20_000) == 99_840 - 20_000
    # 10 segments of 1400 queued in 24000 bytes: 1000 of overhead each; (100000 - 24000) // 2400 = 31 more.
    assert sndbuf_room(14_000, 1400, 100_000, 24_000) == 31 * 1400
    # More queued than the scaled buffer (75% of 8 MiB) but less than the whole: no room, no wrap-around.
    assert sndbuf_room(0, 1400, 8 << 20, 7 << 20) == 0
    assert sndbuf_room(30_000, 1400, 100_000, None) == 99_840 - 30_000
    assert sndbuf_room(200_000, 1400, 100_000, None) == 0


def test_window_is_the_smaller_of_peer_and_buffer() -> None:
    """min(tcpi_snd_wnd, room); a room under one MSS is zero while data went out within ten RTTs."""
    info = info_bytes(snd_wnd=50_000, rtt=2000, last_data_sent=100)
    assert window_from_sndbuf(info, 1400, 0, 1 << 20, 0) == 50_000
    assert window_from_sndbuf(info, 1400, 0, 30_000, 0) == 29_952
    # Room 1024 < MSS with data queued, last sent 100 ms ago, RTT 2 ms (ceiling 2 ms, ten RTTs 20 ms): kept.
    tiny = 2048
    assert window_from_sndbuf(info, 1400, 1024, tiny, 1024) == 1024
    # Data sent 5 ms ago: the small room is offered as zero (silly window avoidance).
    recent = info_bytes(snd_wnd=50_000, rtt=2000, last_data_sent=5)
    assert window_from_sndbuf(recent, 1400, 1024, tiny, 1024) == 0
    # Nothing queued: the buffer size itself is the limit, never zeroed.
    assert window_from_sndbuf(recent, 1400, 0, 1024, 0) == 1024


def test_offered_window_bounds() -> None:
    """At most 16 MiB; at least the RFC 6928 window on a SYN, never forced up once established."""
    assert offered(1 << 30, True) == MAX_WINDOW == 1 << 24
    assert offered(0, True) == 0
    assert offered(0, False) == WINDOW_DEFAULT
    assert offered(40_000, False) == 40_000


def test_low_rtt_table_keeps_a_hole_and_drops_the_oldest() -> None:
    """Low minimum RTTs only (none measured yet is not low); seven entries at most, the oldest goes first."""
    assert tcpinfo.low_rtt(info_bytes(min_rtt=10))
    assert not tcpinfo.low_rtt(info_bytes(min_rtt=11))
    assert not tcpinfo.low_rtt(info_bytes(min_rtt=tcpinfo.NO_RTT))
    table = LowRttTable()
    addrs = [bytes([10, 0, 0, i]) for i in range(1, 10)]
    for addr in addrs[:7]:
        table.add(addr)
    table.add(addrs[0])                       # already there: nothing moves
    assert all(addr in table for addr in addrs[:7])
    table.add(addrs[7])
    assert addrs[7] in table and addrs[0] not in table
    table.add(addrs[8])
    assert addrs[8] in table and addrs[1] not in table and addrs[2] in table


@pytest.mark.parametrize(("syn_mss", "v6", "expected"), [
    (1400, False, 1400), (1000, True, 1000), (None, False, 536), (88, False, 88),
    (87, False, None), (0, False, None), (32767, False, 32767), (65480, False, None), (65535, True, None),
])
def test_host_mss(syn_mss: int | None, v6: bool, expected: int | None) -> None:
    """The guest's MSS (536 without the option) for TCP_MAXSEG; what the kernel would refuse is not set."""
    assert host_mss(syn_mss, v6) == expected


# -- HostWindow on real sockets ---------------------------------------------------------------------------


def flow_on(sock: socket.socket, local: bool) -> TcpFlow:
    """An established TcpFlow around ``sock`` (no table, no worker: only what HostWindow reads)."""
    conn = TcpConn(1, 1, 1, 1, 1400, 7, 8, flags=int(tcp.ConnFlag.ESTABLISHED))
    addr = Addressing(False, GUEST_MAC, OUR_MAC, socket.inet_aton(GATEWAY4), socket.inet_aton(GUEST4), 80, 40000)
    return TcpFlow(ref=FlowRef(0, 0), ftype=FlowType.TCP, key=b"", last=0.0, fd=sock.fileno(), sock=sock, conn=conn,
                   addr=addr, isn=0, our_mss=1400, timer=0.0, local=local)


@pytest.mark.parametrize("local", [True, False], ids=["local", "by-send-buffer"])
def test_host_window_closes_when_the_peer_stops_reading(local: bool) -> None:
    """A peer that reads nothing: the window read from the socket goes from its receive window to 0."""
    with socket.socket() as listener, socket.socket() as client:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, HOLD_RCVBUF)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        with server:
            client.setblocking(False)
            window = HostWindow()
            flow = flow_on(client, local)
            first = window.for_segment(flow)
            assert 0 < first <= HOLD_WINDOW_BOUND
            assert window.for_data(flow) == first
            deadline = time.monotonic() + 5
            while window.for_segment(flow) and time.monotonic() < deadline:
                try:
                    client.send(b"x" * 1400)
                except BlockingIOError:
                    time.sleep(0.01)
            assert window.for_segment(flow) == 0
            # The peer reads: the window opens again.
            server.setblocking(False)
            deadline = time.monotonic() + 5
            while window.for_segment(flow) == 0 and time.monotonic() < deadline:
                try:
                    server.recv(1 << 20)
                except BlockingIOError:
                    time.sleep(0.01)
            assert window.for_segment(flow) > 0


def test_host_window_without_snd_wnd_uses_the_send_buffer() -> None:
    """A kernel whose TCP_INFO stops before tcpi_snd_wnd: SO_SNDBUF, scaled, alone."""
    with socket.socket() as sock:
        window = HostWindow(info_len=tcpinfo.TCP_INFO_BASE)
        assert not window.snd_wnd_cap and not window.min_rtt_cap
        expected = scaled_sndbuf(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        assert window.for_segment(flow_on(sock, True)) == expected


# -- through a real switch ------------------------------------------------------------------------------


@pytest.fixture
def servers() -> str:
    """This module's servers beside the switch (the conftest's switch and fe fixtures use them)."""
    return SERVERS


def read_to_fin(conn: GuestTcp, timeout: float = 5.0) -> bytes:
    """ACK the switch's data until its FIN; the data."""
    conn.read_until_fin(timeout=timeout)
    return bytes(conn.received)


@pytest.mark.parametrize(("syn_mss", "v6"), [(1000, False), (1000, True), (None, False), (65480, False)],
                         ids=["1000-ipv4", "1000-ipv6", "no-option", "too-big-for-the-kernel"])
def test_host_socket_carries_the_guest_mss(fe: VhostUserFrontend, syn_mss: int | None, v6: bool) -> None:
    """The host peer of a guest's connection sees the MSS of the guest's SYN (536 without the option); an MSS
    the kernel cannot take leaves the host socket's own."""
    conn = GuestTcp(fe, MSS_PORT, 40100, v6=v6)
    # The MSS option alone (its first 4 bytes), or no option at all.
    conn.send(SYN, options=tcp.syn_options(syn_mss, 7)[:4] if syn_mss else b"")
    (synack,) = conn.recv()
    assert synack.flags == SYN | ACK
    conn.ack = tcp.seq_add(synack.seq, 1)
    conn.send(ACK)
    peer_mss = int(read_to_fin(conn))
    if syn_mss is None:
        assert 536 - 40 <= peer_mss <= 536
    elif syn_mss <= 32767:
        assert syn_mss - 40 <= peer_mss <= syn_mss
    else:
        assert peer_mss > 16000                  # the loopback's own, not a clamp of ours


@dataclass
class Push:
    """Data the scripted guest sends within the windows the switch offers, and what it saw."""

    conn: GuestTcp
    data: bytes
    base: int
    sent: int = 0
    acked: int = 0
    window: int = 0
    #: Windows of the switch's ACKs, in bytes, in order.
    windows: list[int] = field(default_factory=list)

    def take(self, segs: list[Seg]) -> bool:
        """Take the switch's ACKs (window scale 8: ours); whether any came."""
        got = False
        for seg in segs:
            offset = tcp.seq_diff(seg.ack, self.base)
            if seg.flags & ACK and offset <= len(self.data) and offset >= self.acked:
                self.acked = offset
                self.window = seg.window << tcp.OUR_WS
                self.windows.append(self.window)
                got = True
        self.sent = max(self.sent, self.acked)
        return got

    def probe(self) -> list[Seg]:
        """A zero-window probe (no data, the sequence number before the next): the switch's answer."""
        self.conn.send(ACK, seq=tcp.seq_add(self.base, self.acked - 1))
        return self.conn.recv(timeout=1.0)

    def run(self, until_closed: bool, timeout: float = 10.0) -> None:
        """Send what the window allows; return once all is ACKed, or (``until_closed``) once the switch offers
        no window with everything ACKed.  A closed window is otherwise probed; unACKed data is resent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.acked < len(self.data):
            room = self.window - (self.sent - self.acked)
            if room > 0 and self.sent < len(self.data):
                n = min(1400, room, len(self.data) - self.sent)
                self.conn.send(ACK, self.data[self.sent:self.sent + n], seq=tcp.seq_add(self.base, self.sent))
                self.sent += n
                continue
            if self.take(self.conn.recv(timeout=0.3)):
                continue
            if self.sent > self.acked:
                self.sent = self.acked           # nothing came: send the rest again, as a guest would
            elif self.window == 0:
                if until_closed:
                    return
                self.take(self.probe())
        assert self.acked == len(self.data) or (until_closed and self.window == 0), (self.acked, self.window)


def test_window_follows_the_host_peer(fe: VhostUserFrontend) -> None:
    """A host peer that stops reading: the window offered to the guest is the peer's receive window
    (TCP_INFO), not the room in the switch's send buffer, and closes; a probe gets a zero window, and once the
    peer reads, the switch announces the open window by itself.  All data arrives intact."""
    conn = GuestTcp(fe, HOLD_PORT, 40200)
    synack = conn.connect()
    data = random.Random(22).randbytes(256 * 1024)
    push = Push(conn, data, conn.seq, window=synack.window)
    push.run(until_closed=True)
    assert push.window == 0 and push.acked == push.sent, "the window never closed"
    assert push.acked < len(data)
    # After the first ACK, which may still show the handshake's window, each is at most the peer's.
    assert push.windows and max(push.windows[1:], default=0) <= HOLD_WINDOW_BOUND, push.windows
    # A zero-window probe is answered at once, the window still closed.
    answer = push.probe()
    assert answer and answer[-1].flags & ACK and answer[-1].window == 0
    # The peer reads: the switch says so by itself (no probe), within a few of its one-second timer passes.
    # (On the other queue pair: nothing of the held connection is read, and lost, meanwhile.)
    GuestTcp(fe, GO_PORT, 40201, pair=1).connect()
    deadline = time.monotonic() + 5
    while push.window == 0 and time.monotonic() < deadline:
        push.take(conn.recv(timeout=0.5))
    assert push.window > 0, "no window update after the peer read"
    push.run(until_closed=False, timeout=30.0)
    conn.seq = tcp.seq_add(push.base, len(data))
    conn.send(FIN | ACK)
    assert read_to_fin(conn, timeout=10.0).decode() == hashlib.sha256(data).hexdigest()
