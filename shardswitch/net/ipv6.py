"""IPv6 headers: validating parser with extension-header walk, builder, address helpers.

Theory of operation: :func:`parse` takes the Ethernet payload of an IPv6
frame as a ``memoryview`` and checks, before trusting any field: the 40-byte
fixed header fits, the version is 6, the payload length fits the buffer
(trailing Ethernet padding is cut off), the source is not multicast
(RFC 4291 section 2.7) and neither address is IPv4-mapped (``::ffff:0:0/96``,
RFC 4291 section 2.5.5.2: never on the wire; above this layer an address is a
16-byte :mod:`~shardswitch.net.inany` value where IPv4-mapped *means* IPv4, so
such a packet would be an IPv4 flow in an IPv6 frame).  It then walks the extension headers (RFC 8200
section 4) that may precede the upper-layer header:

* hop-by-hop options (only directly after the fixed header), destination
  options and routing headers are skipped, each after checking that its
  2-byte prefix and its whole length, ``(hdr_ext_len + 1) * 8`` bytes, lie
  inside the payload; their options are not interpreted (as passt does);
* a routing header with segments left would make us a forwarding hop of a
  source route: dropped as ``IPV6_ROUTING``;
* a fragment header is ``IPV6_FRAGMENT`` (we do not reassemble);
* at most :data:`MAX_EXTENSION_HEADERS` are walked, so a guest cannot make
  one frame cost thousands of loop iterations;
* any other next-header value (TCP, UDP, ICMPv6, ESP, No Next Header, ...)
  ends the walk and is reported as the packet's upper-layer protocol.

The result, :class:`Ipv6Packet`, is what a dispatcher needs: the final next
header, zero-copy views of the datagram and of the upper-layer payload, and
the addresses as 16-byte ``bytes`` (addresses are ``bytes`` everywhere in
the data path; :func:`addr_from_str` / :func:`addr_to_str` convert at the
edges).  Handlers of IPv6 packets have the shape ``handler(eth_src: bytes,
packet: Ipv6Packet, now: float, out: list[bytes]) -> None``, like the IPv4
handlers of :mod:`shardswitch.net.endpoint`.

:func:`pack_header_into` writes a fixed header (no extension headers) into
a caller's buffer; :func:`pseudo_header` gives the upper-layer checksum
contribution of the RFC 8200 section 8.1 pseudo-header as a ``start`` value
for :mod:`shardswitch.net.checksum`: a 16-byte address read as one
big-endian integer is congruent, modulo 0xFFFF, to the sum of its 16-bit
words, so no per-word loop is needed.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from .checksum import BytesLike
from .drop import DropReason, PacketError

#: Version/traffic class/flow label, payload length, next header, hop limit,
#: source, destination.
HEADER = struct.Struct("!IHBB16s16s")
#: Length of the fixed header.
IPV6_HLEN = HEADER.size
assert IPV6_HLEN == 40
#: Length of an IPv6 address.
IPV6_ALEN = 16
#: Most extension headers :func:`parse` walks before giving up.
MAX_EXTENSION_HEADERS = 8
#: Hop limit of the packets we originate (NDP uses 255, see ndp.py).
DEFAULT_HOP_LIMIT = 64
#: The minimum link MTU of IPv6 (RFC 8200 5).
MIN_MTU = 1280
#: Largest payload length field.
MAX_PAYLOAD = 0xFFFF
#: The unspecified address ::.
UNSPECIFIED = bytes(IPV6_ALEN)
#: ::1
LOOPBACK = bytes(IPV6_ALEN - 1) + b"\x01"
#: The first 12 bytes of an IPv4-mapped address (::ffff:0:0/96).
V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
#: The link-local all-nodes multicast address ff02::1.
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
#: The link-local all-routers multicast address ff02::2.
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
#: First 13 bytes of a solicited-node multicast address (ff02::1:ff00:0/104).
SOLICITED_NODE_PREFIX = bytes.fromhex("ff0200000000000000000001ff")
#: First 8 bytes of a link-local unicast address built by :func:`link_local_from_mac`.
LINK_LOCAL_PREFIX = bytes.fromhex("fe80000000000000")
#: Ethernet prefix of IPv6 multicast MAC addresses (RFC 2464 section 7).
MULTICAST_MAC_PREFIX = b"\x33\x33"


class NextHeader(IntEnum):
    """Next-header values the parser acts on or callers dispatch on."""

    HOP_BY_HOP = 0
    TCP = 6
    UDP = 17
    ROUTING = 43
    FRAGMENT = 44
    ESP = 50
    AH = 51
    ICMPV6 = 58
    NO_NEXT_HEADER = 59
    DEST_OPTS = 60


#: Extension headers that are skipped by their length.
_SKIPPED = frozenset((NextHeader.HOP_BY_HOP, NextHeader.ROUTING, NextHeader.DEST_OPTS))
#: Offset of "segments left" inside a routing header.
_SEGMENTS_LEFT_OFFSET = 3


@dataclass(slots=True)
class Ipv6Packet:
    """A validated IPv6 packet; views point into the guest's frame."""

    #: Source address (16 bytes).
    src: bytes
    #: Destination address (16 bytes).
    dst: bytes
    #: Upper-layer protocol after the extension headers (see :class:`NextHeader`).
    next_header: int
    #: Hop limit as received.
    hop_limit: int
    #: Traffic class (DSCP + ECN) byte.
    traffic_class: int
    #: Fixed header, extension headers and payload, cut to the payload length.
    datagram: memoryview
    #: The upper-layer payload (after all extension headers).
    payload: memoryview
    #: The guest left the TCP/UDP checksum partial (NEEDS_CSUM): L4 parsers must not verify it.
    csum_partial: bool = False


def parse(data: memoryview) -> Ipv6Packet:
    """Validate and decode the IPv6 packet at the start of ``data``.

    Raises :class:`PacketError` with ``IPV6_MALFORMED``, ``IPV6_FRAGMENT``
    or ``IPV6_ROUTING``.
    """
    available = len(data)
    if available < IPV6_HLEN:
        raise PacketError(DropReason.IPV6_MALFORMED, f"{available} bytes, shorter than a header")
    first, payload_len, next_header, hop_limit, src, dst = HEADER.unpack_from(data)
    if first >> 28 != 6:
        raise PacketError(DropReason.IPV6_MALFORMED, f"version {first >> 28}")
    end = IPV6_HLEN + payload_len
    if end > available:
        raise PacketError(DropReason.IPV6_MALFORMED,
                          f"payload length {payload_len} in {available} bytes")
    if is_multicast(src):
        raise PacketError(DropReason.IPV6_MALFORMED, "multicast source")
    if src[:12] == V4_MAPPED_PREFIX or dst[:12] == V4_MAPPED_PREFIX:
        raise PacketError(DropReason.IPV6_V4_MAPPED, "IPv4-mapped address")
    datagram = data[:end]
    next_header, offset = walk_extension_headers(datagram, next_header)
    return Ipv6Packet(src, dst, next_header, hop_limit, (first >> 20) & 0xFF, datagram,
                      datagram[offset:])


def walk_extension_headers(datagram: memoryview, next_header: int) -> tuple[int, int]:
    """Skip the extension headers after the fixed header of ``datagram``.

    ``next_header`` is the fixed header's next-header field; ``datagram`` is
    cut to the payload length.  Returns ``(upper-layer protocol, offset of
    its header)``.  Raises :class:`PacketError`: ``IPV6_MALFORMED`` (a
    header out of bounds, a misplaced hop-by-hop header, more than
    :data:`MAX_EXTENSION_HEADERS`), ``IPV6_FRAGMENT``, ``IPV6_ROUTING``.
    """
    end = len(datagram)
    offset = IPV6_HLEN
    for count in range(MAX_EXTENSION_HEADERS + 1):
        if next_header == NextHeader.FRAGMENT:
            raise PacketError(DropReason.IPV6_FRAGMENT)
        if next_header not in _SKIPPED:
            return next_header, offset
        if count == MAX_EXTENSION_HEADERS:
            break
        if next_header == NextHeader.HOP_BY_HOP and count:
            raise PacketError(DropReason.IPV6_MALFORMED, "hop-by-hop header not first")
        if offset + 2 > end:
            raise PacketError(DropReason.IPV6_MALFORMED,
                              f"extension header {next_header} truncated at {offset}")
        header_len = (datagram[offset + 1] + 1) * 8
        if offset + header_len > end:
            raise PacketError(DropReason.IPV6_MALFORMED,
                              f"extension header {next_header} of {header_len} bytes at {offset} "
                              f"in {end}")
        if next_header == NextHeader.ROUTING and datagram[offset + _SEGMENTS_LEFT_OFFSET]:
            raise PacketError(DropReason.IPV6_ROUTING,
                              f"{datagram[offset + _SEGMENTS_LEFT_OFFSET]} segments left")
        next_header = datagram[offset]
        offset += header_len
    raise PacketError(DropReason.IPV6_MALFORMED,
                      f"more than {MAX_EXTENSION_HEADERS} extension headers")


def pack_header_into(buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes,
                     next_header: int, payload_len: int, *, hop_limit: int = DEFAULT_HOP_LIMIT,
                     traffic_class: int = 0, flow_label: int = 0) -> None:
    """Write a 40-byte IPv6 header (no extension headers) into ``buf`` at ``offset``.

    ``payload_len`` over 65535 raises ValueError (a caller bug, not guest
    input; jumbograms are not supported).
    """
    if payload_len > MAX_PAYLOAD:
        raise ValueError(f"IPv6 payload of {payload_len} bytes is too long")
    first = (6 << 28) | (traffic_class << 20) | (flow_label & 0xFFFFF)
    HEADER.pack_into(buf, offset, first, payload_len, next_header, hop_limit, src, dst)


def pseudo_header(src: bytes, dst: bytes, next_header: int, length: int) -> int:
    """A ``start`` value for the upper-layer checksum over the IPv6 pseudo-header.

    ``length`` is the upper-layer packet length (header and data).  The
    result is not folded; pass it as ``start`` to the functions of
    :mod:`shardswitch.net.checksum`.
    """
    return int.from_bytes(src, "big") + int.from_bytes(dst, "big") + length + next_header


def is_unspecified(addr: BytesLike) -> bool:
    """True for ::."""
    return addr == UNSPECIFIED


def is_multicast(addr: BytesLike) -> bool:
    """True for ff00::/8."""
    return addr[0] == 0xFF


def is_link_local(addr: BytesLike) -> bool:
    """True for link-local unicast fe80::/10."""
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def is_solicited_node(addr: BytesLike) -> bool:
    """True for a solicited-node multicast address ff02::1:ffXX:XXXX."""
    return addr[:13] == SOLICITED_NODE_PREFIX


def solicited_node(addr: bytes) -> bytes:
    """The solicited-node multicast address of ``addr`` (RFC 4291 section 2.7.1)."""
    return SOLICITED_NODE_PREFIX + addr[13:]


def multicast_mac(addr: bytes) -> bytes:
    """The Ethernet destination of multicast address ``addr``: 33:33 + its last 4 bytes."""
    return MULTICAST_MAC_PREFIX + addr[12:]


def link_local_from_mac(mac: bytes) -> bytes:
    """The fe80::/64 address with the modified EUI-64 identifier of ``mac`` (RFC 4291 appendix A).

    E.g. 9a:55:9a:55:9a:55 gives fe80::9855:9aff:fe55:9a55.
    """
    return LINK_LOCAL_PREFIX + bytes((mac[0] ^ 0x02, mac[1], mac[2], 0xFF, 0xFE,
                                      mac[3], mac[4], mac[5]))


def prefix_of(addr: bytes, length: int) -> bytes:
    """``addr`` with all but its first ``length`` bits cleared (0 <= length <= 128)."""
    mask = ((1 << 128) - 1) ^ ((1 << (128 - length)) - 1)
    return (int.from_bytes(addr, "big") & mask).to_bytes(IPV6_ALEN, "big")


def addr_from_str(text: str) -> bytes:
    """Parse IPv6 text into 16 bytes (ValueError if invalid or with a zone index)."""
    if "%" in text:
        raise ValueError(f"zone index in IPv6 address {text!r}")
    return ipaddress.IPv6Address(text).packed


def addr_to_str(addr: BytesLike) -> str:
    """Format 16 bytes as compressed IPv6 text."""
    return str(ipaddress.IPv6Address(bytes(addr)))
