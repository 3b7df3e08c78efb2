"""Independent IPv6 / ICMPv6 reference helpers of the net tests.

Packed with their own struct formats and checksummed word by word with
:func:`~tests.net.net_testlib.rfc1071`, so a bug shared by these builders and
the codecs under test cannot hide itself; test_net_ipv6.py, test_net_icmp.py,
test_net_ndp.py and the DHCPv6 and NDP kits build and check frames with them.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from tests.net.net_testlib import GUEST_MAC, OUR_MAC, eth_frame, rfc1071

#: The guest's link-local address (EUI-64 of GUEST_MAC) and our link-local address.
GUEST_LL = socket.inet_pton(socket.AF_INET6, "fe80::5054:ff:fe12:3456")
OUR_LL = socket.inet_pton(socket.AF_INET6, "fe80::9855:9aff:fe55:9a55")
ALL_NODES = socket.inet_pton(socket.AF_INET6, "ff02::1")


def ip6(text: str) -> bytes:
    """IPv6 text to 16 bytes."""
    return socket.inet_pton(socket.AF_INET6, text)


def ipv6_packet(src: bytes, dst: bytes, next_header: int, payload: bytes, *,
                hop_limit: int = 64, traffic_class: int = 0, flow_label: int = 0) -> bytes:
    """A fixed IPv6 header followed by ``payload`` (extension headers included by the caller)."""
    first = (6 << 28) | (traffic_class << 20) | flow_label
    return struct.pack("!IHBB16s16s", first, len(payload), next_header, hop_limit, src,
                       dst) + payload


def icmpv6_checksum(src: bytes, dst: bytes, message: bytes) -> int:
    """Reference ICMPv6 checksum: RFC 8200 pseudo-header then the message, word by word."""
    pseudo = src + dst + struct.pack("!I", len(message)) + b"\0\0\0" + bytes((58,))
    return rfc1071(pseudo + message)


def icmpv6_message(src: bytes, dst: bytes, kind: int, code: int, body: bytes, *,
                   good_checksum: bool = True) -> bytes:
    """An ICMPv6 message (type, code, checksum, body) with a right or wrong checksum."""
    message = bytes((kind, code, 0, 0)) + body
    csum = icmpv6_checksum(src, dst, message)
    if not good_checksum:
        csum ^= 0x0101
    return message[:2] + struct.pack("!H", csum) + message[4:]


def icmpv6_frame(src: bytes, dst: bytes, kind: int, code: int, body: bytes, *,
                 hop_limit: int = 255, eth_dst: bytes = OUR_MAC, eth_src: bytes = GUEST_MAC,
                 extensions: bytes = b"", first_header: int = 58,
                 good_checksum: bool = True) -> bytes:
    """A complete guest frame carrying one ICMPv6 message."""
    message = icmpv6_message(src, dst, kind, code, body, good_checksum=good_checksum)
    return eth_frame(eth_dst, eth_src, 0x86DD,
                     ipv6_packet(src, dst, first_header if extensions else 58,
                                 extensions + message, hop_limit=hop_limit))


@dataclass
class Icmpv6Frame:
    """A decoded, fully checked Ethernet/IPv6/ICMPv6 frame."""

    eth_dst: bytes
    eth_src: bytes
    src: bytes
    dst: bytes
    hop_limit: int
    type: int
    code: int
    #: The message after type, code and checksum.
    body: bytes


def decode_icmpv6_frame(frame: bytes) -> Icmpv6Frame:
    """Decode a frame we emit: no extension headers, exact lengths, right checksum."""
    dst_mac, src_mac, ethertype = struct.unpack_from("!6s6sH", frame)
    assert ethertype == 0x86DD
    first, payload_len, next_header, hop_limit, src, dst = struct.unpack_from(
        "!IHBB16s16s", frame, 14)
    assert first >> 28 == 6 and next_header == 58
    message = frame[54:]
    assert payload_len == len(message), "payload length equals the message"
    assert len(message) >= 8
    assert icmpv6_checksum(src, dst, message) == 0, "ICMPv6 checksum"
    assert src[0] != 0xFF, "unicast source"
    if dst[0] == 0xFF:
        assert dst_mac == b"\x33\x33" + dst[12:], "multicast MAC for a multicast destination"
    return Icmpv6Frame(dst_mac, src_mac, src, dst, hop_limit, message[0], message[1], message[4:])
