"""Helpers of the TCP tests that drive a switch as a scripted guest: addresses, servers, segment parsing and a
connection played by hand (:class:`GuestTcp`)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.net import ipv4, ipv6, tcp
from shardswitch.net.tcp import Addressing, TcpFlag

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST4, GATEWAY4 = "10.0.2.15", "10.0.2.2"
GUEST6 = "fe80::5054:ff:fe12:3456"
#: The guest's IPv6 address given by tests.switch.DEFAULT_ADDRESSING.
GUEST6_CONFIGURED = "2001:db8:2::15"
ROUTER6 = "fe80::9855:9aff:fe55:9a55"
ECHO, BLOB, SINK, CLOSED = 7001, 7002, 7003, 9
BLOB_SIZE = 300_000
SYN, ACK, FIN, RST, PSH = TcpFlag.SYN, TcpFlag.ACK, TcpFlag.FIN, TcpFlag.RST, TcpFlag.PSH

#: Servers in the test namespace: echo (until EOF, also on ::1), blob (BLOB_SIZE bytes then close), sink (sha256 back).
SERVERS = f"""
import hashlib, socket, threading
def blob(n):
    return bytes(i * 7 % 251 for i in range(n))
def serve(port, fn, family=socket.AF_INET, host="127.0.0.1"):
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(64)
    while True:
        c, _ = s.accept(); threading.Thread(target=fn, args=(c,), daemon=True).start()
def echo(c):
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d)
    except OSError: pass
    c.close()
def send_blob(c):
    c.sendall(blob({BLOB_SIZE})); c.close()
def sink(c):
    h = hashlib.sha256()
    while True:
        d = c.recv(65536)
        if not d: break
        h.update(d)
    c.sendall(h.hexdigest().encode()); c.close()
for port, fn in (({ECHO}, echo), ({BLOB}, send_blob), ({SINK}, sink)):
    threading.Thread(target=serve, args=(port, fn), daemon=True).start()
threading.Thread(target=serve, args=({ECHO}, echo, socket.AF_INET6, "::1"), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def blob(n: int) -> bytes:
    """The blob server's data."""
    return bytes(i * 7 % 251 for i in range(n))


@dataclass
class Seg:
    """A segment the switch sent to the guest."""

    flags: int
    seq: int
    ack: int
    window: int
    payload: bytes
    mss: int | None
    sport: int
    dport: int


def parse_frame(frame: bytes) -> Seg | None:
    """A TCP segment from a frame to the guest (checksums checked), None for other frames."""
    assert frame[:6] == GUEST_MAC and frame[6:12] == OUR_MAC
    if frame[12:14] == b"\x86\xdd":
        packet6 = ipv6.parse(memoryview(frame)[14:])
        if packet6.next_header != 6:
            return None
        seg = tcp.parse6(packet6)
    elif frame[12:14] == b"\x08\x00":
        packet = ipv4.parse(memoryview(frame)[14:])
        if packet.proto != 6:
            return None
        seg = tcp.parse4(packet)
    else:
        return None
    return Seg(seg.flags, seg.seq, seg.ack, seg.window, bytes(seg.payload), seg.mss, seg.src_port, seg.dst_port)


class GuestTcp:
    """One connection played by the test as the guest."""

    def __init__(self, fe: VhostUserFrontend, port: int, sport: int, pair: int = 0, v6: bool = False,
                 dst: str | None = None) -> None:
        """A connection from GUEST4:sport to GATEWAY4:port (or over IPv6 link-local to our router) on queue
        pair ``pair``; ``dst``: another destination of that family (any text inet_pton takes)."""
        self.fe = fe
        self.pair = pair
        if v6:
            src = socket.inet_pton(socket.AF_INET6, GUEST6)
            dst_addr = socket.inet_pton(socket.AF_INET6, dst or ROUTER6)
        else:
            src, dst_addr = socket.inet_aton(GUEST4), socket.inet_aton(dst or GATEWAY4)
        self.addr = Addressing(v6, OUR_MAC, GUEST_MAC, src, dst_addr, sport, port)
        self.seq = 1000
        self.ack = 0
        self.received = bytearray()

    def send(self, flags: int, payload: bytes = b"", *, seq: int | None = None, window: int = 65535,
             options: bytes = b"", pair: int | None = None) -> None:
        """Send one segment (sequence advanced for SYN, payload and FIN unless ``seq`` is given)."""
        use = self.seq if seq is None else seq
        frame = tcp.build(self.addr, use, self.ack, int(flags), window, options, payload)
        self.fe.send_frame(self.pair if pair is None else pair, bytes(frame))
        if seq is None:
            self.seq = tcp.seq_add(self.seq, len(payload) + (1 if flags & (SYN | FIN) else 0))

    def recv(self, timeout: float = 3.0, expect: int = 1) -> list[Seg]:
        """Segments of this connection the switch sent, waiting for ``expect`` of them."""
        got: list[Seg] = []
        deadline = time.monotonic() + timeout
        while len(got) < expect and time.monotonic() < deadline:
            frames = self.fe.recv_frames(self.pair, timeout=max(0.05, deadline - time.monotonic()))
            self.fe.post_rx(self.pair, len(frames))
            for frame in frames:
                seg = parse_frame(frame)
                if seg is not None and seg.dport == self.addr.src_port:
                    got.append(seg)
        return got

    def connect(self) -> Seg:
        """SYN (MSS 1400, window scale 7) -> SYN-ACK -> ACK."""
        self.send(SYN, options=tcp.syn_options(1400, 7))
        (synack,) = self.recv()
        assert synack.flags == SYN | ACK and synack.ack == self.seq, synack
        self.ack = tcp.seq_add(synack.seq, 1)
        self.send(ACK)
        return synack

    def read(self, size: int, timeout: float = 3.0) -> bytes:
        """In-order data until ``size`` bytes came (duplicates ignored); ACKs nothing."""
        data = b""
        deadline = time.monotonic() + timeout
        while len(data) < size and time.monotonic() < deadline:
            for seg in self.recv(timeout=max(0.05, deadline - time.monotonic())):
                if seg.payload and seg.seq == self.ack:
                    data += seg.payload
                    self.ack = tcp.seq_add(self.ack, len(seg.payload))
        return data

    def read_until_fin(self, timeout: float = 10.0) -> None:
        """ACK in-order data as it comes until the switch's FIN; ACK that too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for seg in self.recv(timeout=max(0.1, deadline - time.monotonic())):
                if seg.seq == self.ack and seg.payload:
                    self.received += seg.payload
                    self.ack = tcp.seq_add(self.ack, len(seg.payload))
                if seg.flags & FIN and tcp.seq_add(seg.seq, len(seg.payload)) == self.ack:
                    self.ack = tcp.seq_add(self.ack, 1)
                    self.send(ACK)
                    return
                self.send(ACK)
        raise AssertionError(f"no FIN after {len(self.received)} bytes")
