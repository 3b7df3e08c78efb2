"""Checksum offload and TSO from the guest, through a real switch driven by the Python front-end.

The front-end negotiates VIRTIO_NET_F_CSUM, HOST_TSO4/6 and GUEST_CSUM as a
Linux guest does, then sends what such a guest sends: frames whose virtio-net
header has NEEDS_CSUM and whose TCP/UDP checksum holds only the pseudo-header
sum, and TCP segments far larger than an MSS.  The switch must take them
(verifying nothing), send each TSO segment to the host socket whole, and
answer with frames whose header says DATA_VALID and whose data segments
carry no computed checksum.  Without CSUM negotiated the same partial
checksums are refused.  Servers (a TCP sink answering the SHA-256 of what it
got, a TCP blob sender, a UDP echo) run in the test's namespace.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import pytest

from shardswitch.frontend.client import BASE_FEATURES, VhostUserFrontend
from shardswitch.net import ipv4, ipv6, tcp, udp
from shardswitch.net.tcp import Addressing, TcpFlag
from shardswitch.vhost.wire import VirtioFeature
from shardswitch.virtio.netdev import VNET_HDR, GsoType, VnetHdrFlags
from shardswitch.worker.peers import Peers, inbox_pairs
from shardswitch.net.udp import parse6
from tests.net.offload_lib import l4_checksum, l4_offsets, make_partial, needs_csum_header
from tests.switch import Switch
from tests.switchkit import ready_frontend

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST4, GATEWAY4 = "10.0.2.15", "10.0.2.2"
GUEST6 = "fe80::5054:ff:fe12:3456"
ROUTER6 = "fe80::9855:9aff:fe55:9a55"
SINK, BLOB, UDP_ECHO = 7201, 7202, 7203
BLOB_SIZE = 200_000
SYN, ACK, FIN, PSH = TcpFlag.SYN, TcpFlag.ACK, TcpFlag.FIN, TcpFlag.PSH
#: What a Linux guest negotiates (less GUEST_TSO, which is not offered).
OFFLOADS = VirtioFeature.CSUM | VirtioFeature.GUEST_CSUM | VirtioFeature.HOST_TSO4 | VirtioFeature.HOST_TSO6
FEATURES = int(BASE_FEATURES | VirtioFeature.EVENT_IDX | VirtioFeature.MRG_RXBUF | OFFLOADS)
PLAIN = int(BASE_FEATURES | VirtioFeature.EVENT_IDX | VirtioFeature.MRG_RXBUF)

SERVERS = f"""
import hashlib, socket, threading
def serve(port, fn, family):
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", port)); s.listen(16)
    while True:
        c, _ = s.accept(); threading.Thread(target=fn, args=(c,), daemon=True).start()
def sink(c):
    h = hashlib.sha256()
    while True:
        d = c.recv(1 << 20)
        if not d: break
        h.update(d)
    c.sendall(h.hexdigest().encode()); c.close()
def blob(c):
    c.sendall(bytes(i * 7 % 251 for i in range({BLOB_SIZE}))); c.close()
def udp_echo(family):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", {UDP_ECHO}))
    while True:
        d, peer = s.recvfrom(65535); s.sendto(b"echo:" + d, peer)
for fam in (socket.AF_INET, socket.AF_INET6):
    for port, fn in (({SINK}, sink), ({BLOB}, blob)):
        threading.Thread(target=serve, args=(port, fn, fam), daemon=True).start()
    threading.Thread(target=udp_echo, args=(fam,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def blob(n: int) -> bytes:
    """The blob server's data."""
    return bytes(i * 7 % 251 for i in range(n))


class Guest:
    """One TCP connection played by the test as an offloading guest; collects what comes back."""

    def __init__(self, fe: VhostUserFrontend, port: int, sport: int, v6: bool = False, partial: bool = True) -> None:
        """A connection to the gateway's ``port``; ``partial``: send NEEDS_CSUM frames with partial checksums."""
        self.fe = fe
        if v6:
            src, dst = socket.inet_pton(socket.AF_INET6, GUEST6), socket.inet_pton(socket.AF_INET6, ROUTER6)
        else:
            src, dst = socket.inet_aton(GUEST4), socket.inet_aton(GATEWAY4)
        self.addr = Addressing(v6, OUR_MAC, GUEST_MAC, src, dst, sport, port)
        self.partial = partial
        self.seq = 1000
        self.ack = 0
        #: (virtio-net header, frame) of every segment of this connection the switch sent.
        self.frames: list[tuple[bytes, bytes]] = []

    def send(self, flags: int, payload: bytes = b"", pair: int = 0, options: bytes = b"") -> None:
        """One segment (a TSO segment when the payload is larger than 1400 bytes); sequence advanced."""
        frame = tcp.build(self.addr, self.seq, self.ack, int(flags), 65535, options, payload)
        hdr = None
        if self.partial:
            frame = make_partial(frame)
            big = len(payload) > 1400
            gso = (GsoType.TCPV6 if self.addr.v6 else GsoType.TCPV4) if big else GsoType.NONE
            hdr = needs_csum_header(frame, gso, 1400 if big else 0)
        self.fe.send_frame(pair, bytes(frame), hdr=hdr)
        self.seq = tcp.seq_add(self.seq, len(payload) + (1 if flags & (SYN | FIN) else 0))

    def recv(self, pair: int = 0, timeout: float = 3.0) -> list[tcp.TcpSegment]:
        """Segments of this connection that came within ``timeout`` (at least one, unless none came)."""
        got: list[tcp.TcpSegment] = []
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline:
            packets = self.fe.recv_packets(pair, timeout=max(0.05, deadline - time.monotonic()))
            self.fe.post_rx(pair, len(packets))
            for hdr, frame in packets:
                view = memoryview(frame)[14:]
                if frame[12:14] == b"\x86\xdd":
                    p6 = ipv6.parse(view)
                    seg = tcp.parse6(p6, verify=False) if p6.next_header == 6 else None
                else:
                    p4 = ipv4.parse(view)
                    seg = tcp.parse4(p4, verify=False) if p4.proto == 6 else None
                if seg is not None and seg.dst_port == self.addr.src_port:
                    self.frames.append((hdr, frame))
                    got.append(seg)
        return got

    def connect(self) -> None:
        """SYN -> SYN-ACK -> ACK."""
        self.send(SYN, options=tcp.syn_options(1400, 7))
        (synack,) = self.recv()
        assert synack.flags == SYN | ACK and synack.ack == self.seq
        self.ack = tcp.seq_add(synack.seq, 1)
        self.send(ACK)

    def read_until_fin(self, timeout: float = 10.0) -> bytes:
        """ACK in-order data until the switch's FIN (ACKed too); return the data."""
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for seg in self.recv(timeout=max(0.1, deadline - time.monotonic())):
                if seg.seq == self.ack and seg.payload:
                    data += bytes(seg.payload)
                    self.ack = tcp.seq_add(self.ack, len(seg.payload))
                if seg.flags & FIN and tcp.seq_add(seg.seq, len(seg.payload)) == self.ack:
                    self.ack = tcp.seq_add(self.ack, 1)
                    self.send(ACK)
                    return data
            self.send(ACK)
        raise AssertionError(f"no FIN after {len(data)} bytes")


def drops(switch: Switch) -> dict[str, int]:
    """Drop counters summed over the workers."""
    total: dict[str, int] = {}
    for worker in switch.status()["workers"]:
        for name, count in worker["drops"].items():
            total[name] = total.get(name, 0) + count
    return total


@pytest.fixture
def servers() -> str:
    """This module's servers beside the switch (the conftest's switch fixture uses them)."""
    return SERVERS


@pytest.fixture
def fe(switch: Switch) -> Iterator[VhostUserFrontend]:
    """A front-end that negotiated the offloads."""
    with ready_frontend(switch, features=FEATURES, rx=200) as f:
        yield f


# -- unit: the hand-over prefix --------------------------------------------------------------


def test_hand_over_carries_csum_partial() -> None:
    """The prefix byte brings the flag along; the frame arrives unchanged behind it."""
    (read0, write0), = inbox_pairs(1)
    peers = Peers(0, read0.detach(), (write0.detach(),))
    try:
        assert peers.hand_over(0, b"frame-a", True) and peers.hand_over(0, memoryview(b"frame-b"), False)
        got = [(flag, bytes(frame)) for flag, frame in peers.receive()]
        assert got == [(True, b"frame-a"), (False, b"frame-b")]
        assert peers.handed_out == 2 and peers.handed_in == 2
    finally:
        peers.close()


# -- through the switch -----------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_partial_checksums_and_tso_segments_accepted(switch: Switch, fe: VhostUserFrontend, v6: bool) -> None:
    """NEEDS_CSUM SYN, ACK, 60 KB TSO segments and FIN: each segment ACKed whole, the sink's hash right."""
    conn = Guest(fe, SINK, 41000, v6=v6)
    conn.connect()
    data = blob(180_000)
    for offset in range(0, len(data), 60_000):
        start = conn.seq
        conn.send(ACK, data[offset:offset + 60_000])
        acks = conn.recv()
        # One send() per segment: the ACK covers the whole 60 KB at once.
        assert max(tcp.seq_diff(s.ack, start) for s in acks) == 60_000
    conn.send(FIN | ACK)
    assert conn.read_until_fin() == hashlib.sha256(data).hexdigest().encode()
    assert "TCP_BAD_CHECKSUM" not in drops(switch)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_frames_to_guest_are_data_valid_without_checksum(switch: Switch, fe: VhostUserFrontend, v6: bool) -> None:
    """GUEST_CSUM: every header says DATA_VALID; data segments carry checksum 0; the data is intact."""
    conn = Guest(fe, BLOB, 41001, v6=v6)
    conn.connect()
    assert conn.read_until_fin(timeout=20.0) == blob(BLOB_SIZE)
    data_frames = 0
    for hdr, frame in conn.frames:
        flags, gso_type = VNET_HDR.unpack(hdr)[:2]
        assert flags == VnetHdrFlags.DATA_VALID and gso_type == GsoType.NONE
        start = l4_offsets(frame)[0]
        if len(frame) > start + (frame[start + 12] >> 4) * 4:       # carries data
            data_frames += 1
            assert l4_checksum(frame) == 0
    assert data_frames >= BLOB_SIZE // 1400


def test_partial_checksum_refused_without_csum(switch: Switch) -> None:
    """Without CSUM negotiated a NEEDS_CSUM header is not trusted: the partial SYN is a bad checksum."""
    with ready_frontend(switch, features=PLAIN, rx=200) as plain:
        conn = Guest(plain, SINK, 41002)
        conn.send(SYN, options=tcp.syn_options(1400, 7))
        assert conn.recv(timeout=0.5) == []
        assert drops(switch).get("TCP_BAD_CHECKSUM", 0) >= 1
        # The same guest with full checksums: plain headers, full checksums back.
        conn.partial = False
        conn.seq = 5000
        conn.connect()
        hdr, frame = conn.frames[-1]
        assert VNET_HDR.unpack(hdr)[0] == 0
        assert tcp.parse4(ipv4.parse(memoryview(frame)[14:])).flags == SYN | ACK   # verified


def test_handed_over_segment_keeps_csum_partial(switch: Switch, fe: VhostUserFrontend) -> None:
    """A partial-checksum segment sent on pair 1 for worker 0's flow is handed over and taken, not dropped."""
    conn = Guest(fe, SINK, 41003)
    conn.connect()
    start = conn.seq
    conn.send(ACK | PSH, b"moved across", pair=1)
    acks = conn.recv()
    assert max(tcp.seq_diff(s.ack, start) for s in acks) == len(b"moved across")
    status = switch.status()["workers"]
    assert status[1]["handed_out"] >= 1 and status[0]["handed_in"] >= 1
    assert "TCP_BAD_CHECKSUM" not in drops(switch)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_partial_checksum_and_data_valid_reply(switch: Switch, fe: VhostUserFrontend, v6: bool) -> None:
    """A partial-checksum datagram reaches the echo server; the reply is DATA_VALID with no computed checksum."""
    if v6:
        from shardswitch.net.udp import build_frame6
        frame = build_frame6(OUR_MAC, GUEST_MAC, ipv6.addr_from_str(GUEST6), ipv6.addr_from_str(ROUTER6), 5555,
                             UDP_ECHO, b"partial")
    else:
        frame = udp.build_frame(OUR_MAC, GUEST_MAC, ipv4.addr_from_str(GUEST4), ipv4.addr_from_str(GATEWAY4), 5555,
                                UDP_ECHO, b"partial")
    partial = make_partial(frame)
    fe.send_frame(0, partial, hdr=needs_csum_header(partial))
    replies: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 3
    while not replies and time.monotonic() < deadline:
        replies = [(h, f) for h, f in fe.recv_packets(0, timeout=0.5) if f[12:14] == frame[12:14]]
    assert replies, drops(switch)
    hdr, reply = replies[0]
    assert VNET_HDR.unpack(hdr)[0] == VnetHdrFlags.DATA_VALID
    view = memoryview(reply)[14:]
    if v6:
        datagram = parse6(ipv6.parse(view), verify=False)
        assert l4_checksum(reply) != 0                    # 0 is refused over IPv6, even unverified
    else:
        datagram = udp.parse(ipv4.parse(view))            # checksum 0: "none", valid
        assert l4_checksum(reply) == 0
    assert bytes(datagram.payload) == b"echo:partial"


def test_offloads_follow_each_driver(switch: Switch) -> None:
    """A driver with the offloads, then one without on the same switch: the second gets full checksums, no flags."""
    frame = udp.build_frame(OUR_MAC, GUEST_MAC, ipv4.addr_from_str(GUEST4), ipv4.addr_from_str(GATEWAY4), 5556,
                            UDP_ECHO, b"again")
    for features, flags in ((FEATURES, VnetHdrFlags.DATA_VALID), (PLAIN, 0), (FEATURES, VnetHdrFlags.DATA_VALID)):
        with ready_frontend(switch, features=features, rx=200) as f:
            f.send_frame(0, frame)
            replies: list[tuple[bytes, bytes]] = []
            deadline = time.monotonic() + 3
            while not replies and time.monotonic() < deadline:
                replies = [(h, r) for h, r in f.recv_packets(0, timeout=0.5) if r[12:14] == b"\x08\x00"]
            assert replies
            hdr, reply = replies[0]
            assert VNET_HDR.unpack(hdr)[0] == flags
            assert (l4_checksum(reply) == 0) is bool(flags)
            assert bytes(udp.parse(ipv4.parse(memoryview(reply)[14:])).payload) == b"echo:again"


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_guest_tso_gets_64k_gso_frames(switch: Switch, v6: bool) -> None:
    """GUEST_TSO4/6: host data comes in frames far over the MSS, gso fields set (size = the MSS), data intact."""
    tso = FEATURES | VirtioFeature.GUEST_TSO4 | VirtioFeature.GUEST_TSO6
    with ready_frontend(switch, features=tso, rx=200) as f:
        conn = Guest(f, BLOB, 41010, v6=v6)
        conn.connect()
        assert conn.read_until_fin(timeout=20.0) == blob(BLOB_SIZE)
    headers_len = 74 if v6 else 54
    big = 0
    for hdr, frame in conn.frames:
        flags, gso_type, hdr_len, gso_size = VNET_HDR.unpack(hdr)[:4]
        assert flags == VnetHdrFlags.DATA_VALID
        payload = len(frame) - headers_len
        if payload > 1400:
            big += 1
            assert (gso_type, hdr_len, gso_size) == (GsoType.TCPV6 if v6 else GsoType.TCPV4, headers_len, 1400)
            assert len(frame) - 14 <= 0xFFFF + (40 if v6 else 0)
        else:
            assert gso_type == GsoType.NONE
    assert big >= 2 and len([h for h, _f in conn.frames]) < BLOB_SIZE // 1400


class StingyGuest(Guest):
    """A guest that keeps only a few RX buffers posted: a handful more after each receive."""

    def recv(self, pair: int = 0, timeout: float = 3.0) -> list[tcp.TcpSegment]:
        """Like Guest.recv, then a few buffers more, whatever the frames took."""
        got = super().recv(pair, timeout)
        self.fe.post_rx(pair, 6)
        return got


def test_host_data_in_place_waits_for_rx_buffers(switch: Switch) -> None:
    """Host data written in place into RX buffers: when the guest posts few, frames shrink to what is
    posted, the flow waits for the guest's refill (its RX kick) and the data arrives whole, in order."""
    tso = FEATURES | VirtioFeature.GUEST_TSO4 | VirtioFeature.GUEST_TSO6
    with ready_frontend(switch, features=tso, rx=6) as fe:
        conn = StingyGuest(fe, BLOB, 41020)
        conn.connect()
        assert conn.read_until_fin(timeout=20.0) == blob(BLOB_SIZE)
    # Frames as large as the buffers posted at the time, far below 64 KiB: many more than 200 KB / 64 KiB.
    assert len([f for _hdr, f in conn.frames if len(f) > 54]) >= 10
    assert "RX_NO_BUFFERS" not in drops(switch)
