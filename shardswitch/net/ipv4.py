"""IPv4 headers: validating parser and header builder.

Theory of operation: :func:`parse` takes the Ethernet payload of an IPv4
frame as a ``memoryview`` and checks, in this order, before trusting any
field: the minimum length, the version, the header length (IHL) against the
buffer, the total length against the header length and the buffer, the
header checksum, and finally that the packet is not a fragment (we do not
reassemble).  Trailing bytes after the total length (Ethernet padding) are
cut off.  The result, :class:`Ipv4Packet`, holds the addresses as 32-bit
integers and zero-copy views of the datagram and its payload.  Options are
carried in the header view but not interpreted.

:func:`pack_header_into` writes a 20-byte header (no options) with its
checksum into a caller's buffer.  Addresses are ``int`` everywhere in the
data path; :func:`addr_from_str` / :func:`addr_to_str` convert at the edges.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from . import checksum
from .drop import DropReason, PacketError

#: Version/IHL, TOS, total length, identification, flags/fragment offset,
#: TTL, protocol, header checksum, source, destination.
HEADER = struct.Struct("!BBHHHBBHII")
#: Length of a header without options.
IPV4_HLEN = HEADER.size
assert IPV4_HLEN == 20
_U16 = struct.Struct("!H")
#: Byte offset of the header checksum.
CHECKSUM_OFFSET = 10
#: Mask of the fragment offset in the flags/fragment word.
FRAGMENT_OFFSET_MASK = 0x1FFF
#: The limited broadcast address 255.255.255.255.
BROADCAST = 0xFFFFFFFF
#: The unspecified address 0.0.0.0.
UNSPECIFIED = 0
#: TTL of the packets we originate.
DEFAULT_TTL = 64


class IpProto(IntEnum):
    """IP protocol numbers we dispatch on or name in diagnostics."""

    ICMP = 1
    IGMP = 2
    TCP = 6
    UDP = 17


class FragmentFlags(IntFlag):
    """Flag bits of the flags/fragment-offset word."""

    DF = 0x4000
    MF = 0x2000


#: More fragments or a fragment offset, as a plain int (IntFlag arithmetic builds enum members per packet).
_FRAGMENTED = int(FragmentFlags.MF) | FRAGMENT_OFFSET_MASK


@dataclass(slots=True)
class Ipv4Packet:
    """A validated IPv4 packet; views point into the guest's frame."""

    #: Source address.
    src: int
    #: Destination address.
    dst: int
    #: Payload protocol (see :class:`IpProto`).
    proto: int
    #: Time to live as received.
    ttl: int
    #: Type of service / DSCP+ECN byte.
    tos: int
    #: Header and payload, cut to the total length.
    datagram: memoryview
    #: The payload (after header and options).
    payload: memoryview
    #: The guest left the TCP/UDP checksum partial (NEEDS_CSUM): L4 parsers must not verify it.
    csum_partial: bool = False


def parse(data: memoryview) -> Ipv4Packet:
    """Validate and decode the IPv4 packet at the start of ``data``.

    Raises :class:`PacketError` with ``IPV4_MALFORMED``,
    ``IPV4_BAD_CHECKSUM`` or ``IPV4_FRAGMENT``.
    """
    available = len(data)
    if available < IPV4_HLEN:
        raise PacketError(DropReason.IPV4_MALFORMED, f"{available} bytes, shorter than a header")
    (ver_ihl, tos, total_len, _ident, frag, ttl, proto, _csum, src,
     dst) = HEADER.unpack_from(data)
    if ver_ihl >> 4 != 4:
        raise PacketError(DropReason.IPV4_MALFORMED, f"version {ver_ihl >> 4}")
    hlen = (ver_ihl & 0x0F) * 4
    if hlen < IPV4_HLEN or hlen > available:
        raise PacketError(DropReason.IPV4_MALFORMED, f"header length {hlen} in {available} bytes")
    if total_len < hlen or total_len > available:
        raise PacketError(DropReason.IPV4_MALFORMED,
                          f"total length {total_len}, header {hlen}, {available} bytes")
    if not checksum.is_valid(data[:hlen]):
        raise PacketError(DropReason.IPV4_BAD_CHECKSUM)
    if frag & _FRAGMENTED:
        raise PacketError(DropReason.IPV4_FRAGMENT, f"flags/offset {frag:#06x}")
    datagram = data[:total_len]
    return Ipv4Packet(src, dst, proto, ttl, tos, datagram, datagram[hlen:])


def pack_header_into(buf: bytearray | memoryview, offset: int, src: int, dst: int, proto: int,
                     payload_len: int, *, ttl: int = DEFAULT_TTL, tos: int = 0, ident: int = 0,
                     flags: FragmentFlags = FragmentFlags(0)) -> None:
    """Write a 20-byte IPv4 header, checksum included, into ``buf`` at ``offset``.

    ``payload_len`` must keep the total length within 65535 (ValueError
    otherwise: that is a bug in the caller, not guest input).
    """
    total_len = IPV4_HLEN + payload_len
    if total_len > 0xFFFF:
        raise ValueError(f"IPv4 payload of {payload_len} bytes is too long")
    HEADER.pack_into(buf, offset, 0x45, tos, total_len, ident, int(flags), ttl, proto, 0, src, dst)
    csum = checksum.checksum(memoryview(buf)[offset:offset + IPV4_HLEN])
    _U16.pack_into(buf, offset + CHECKSUM_OFFSET, csum)


def addr_from_str(text: str) -> int:
    """Parse dotted-quad IPv4 text into a 32-bit int (ValueError if invalid)."""
    return int(ipaddress.IPv4Address(text))


def addr_to_str(addr: int) -> str:
    """Format a 32-bit int as dotted-quad text."""
    return str(ipaddress.IPv4Address(addr))
