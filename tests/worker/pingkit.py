"""Helpers of the echo (ping) tests that drive a switch as a scripted guest: addresses, ICMP and ICMPv6 echo
requests from the guest, and the replies read back with their checksums verified."""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.net.checksum import checksum

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST4, GATEWAY4 = "10.0.2.15", "10.0.2.2"
GUEST6 = "fe80::5054:ff:fe12:3456"
ROUTER6 = "fe80::9855:9aff:fe55:9a55"
DATA = b"shardswitch-echo-" * 3


def echo4(ident: int, seq: int, dst: str = GATEWAY4) -> bytes:
    """An Ethernet/IPv4/ICMP echo request from the guest."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + DATA
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
                     socket.inet_aton(GUEST4), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return OUR_MAC + GUEST_MAC + b"\x08\x00" + ip + icmp


def echo6(ident: int, seq: int, dst: str = ROUTER6) -> bytes:
    """An Ethernet/IPv6/ICMPv6 echo request from the guest."""
    src, dst16 = ipaddress.IPv6Address(GUEST6).packed, ipaddress.IPv6Address(dst).packed
    body = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + DATA
    pseudo = src + dst16 + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + src + dst16
    return OUR_MAC + GUEST_MAC + b"\x86\xdd" + ip6 + body


def replies(fe: VhostUserFrontend, pair: int, expect: int = 1, timeout: float = 3.0) -> list[tuple[int, int, int]]:
    """(ICMP type, identifier, sequence) of the echo replies on ``pair``: waits for ``expect`` of them."""
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < expect and time.monotonic() < deadline:
        frames += fe.recv_frames(pair, timeout=max(0.05, deadline - time.monotonic()))
    found = []
    for frame in frames:
        ethertype = frame[12:14]
        if ethertype == b"\x08\x00":
            icmp = frame[14 + (frame[14] & 0xF) * 4:]
            assert checksum(icmp) == 0
        elif ethertype == b"\x86\xdd":
            icmp = frame[54:]
            pseudo = frame[22:54] + struct.pack("!I3xB", len(icmp), 58)
            assert checksum(pseudo + icmp) == 0
        else:
            continue
        kind, _code, _sum, ident, seq = struct.unpack_from("!BBHHH", icmp)
        assert icmp[8:] == DATA
        found.append((kind, ident, seq))
    return found
