"""UDP over IPv4: validating parser and complete-frame builder.

Theory of operation: :func:`parse` takes a validated :class:`Ipv4Packet`
whose protocol is UDP and checks the UDP header against it: the 8-byte
header fits, the UDP length is at least 8 and within the IPv4 payload
(shorter is allowed and trims trailing bytes, as Linux does), and the
checksum, computed over the IPv4 pseudo-header, header and data, is right
unless it is 0 (IPv4 allows senders to omit the UDP checksum).  The result
holds the ports and a zero-copy view of the data.

Checksum offload: a frame whose virtio-net header had NEEDS_CSUM (the
guest negotiated VIRTIO_NET_F_CSUM and left the checksum to the device: the
field holds only the pseudo-header sum) is parsed with ``verify=False`` and
its checksum is not checked; every other one is verified in full.

:func:`build_frame` makes a complete Ethernet + IPv4 + UDP frame around a
payload: the 42 header bytes are packed into one small buffer and joined
with the payload, so the payload is copied exactly once.  A computed UDP
checksum of 0 is sent as 0xFFFF (RFC 768).  With ``csum=False`` (a guest
that takes our frames as verified, DATA_VALID) the checksum is 0, which
IPv4 defines as "no checksum", so the frame is valid either way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import checksum, eth, ipv4, ipv6
from .checksum import BytesLike
from .drop import DropReason, PacketError
from .ipv4 import IpProto, Ipv4Packet
from .ipv6 import Ipv6Packet, NextHeader

#: Source port, destination port, length, checksum.
HEADER = struct.Struct("!HHHH")
#: Length of a UDP header.
UDP_HLEN = HEADER.size
assert UDP_HLEN == 8
#: Bytes of Ethernet, IPv4 and UDP headers in front of a payload we build.
FRAME_HEADERS_LEN = eth.ETH_HLEN + ipv4.IPV4_HLEN + UDP_HLEN
#: Bytes of Ethernet, IPv6 and UDP headers in front of a payload.
FRAME6_HEADERS_LEN = eth.ETH_HLEN + ipv6.IPV6_HLEN + UDP_HLEN
#: UDP checksum field of IPv6 frames to a DATA_VALID guest: not computed, but not 0 (refused over IPv6).
UNCOMPUTED_CSUM6 = 0xFFFF
#: Largest payload :func:`build_frame` accepts (IPv4 total length limit).
MAX_PAYLOAD = 0xFFFF - ipv4.IPV4_HLEN - UDP_HLEN


@dataclass(slots=True)
class UdpDatagram:
    """A validated UDP datagram; ``payload`` points into the guest's frame."""

    #: Source port.
    src_port: int
    #: Destination port.
    dst_port: int
    #: The data after the UDP header, cut to the UDP length.
    payload: memoryview


def _header(data: memoryview) -> tuple[int, int, int, int]:
    """Source port, destination port, length and checksum of the UDP header at the start of ``data``,
    the length checked against the buffer (``UDP_MALFORMED``)."""
    available = len(data)
    if available < UDP_HLEN:
        raise PacketError(DropReason.UDP_MALFORMED, f"{available} bytes, shorter than a header")
    src_port, dst_port, length, csum = HEADER.unpack_from(data)
    if length < UDP_HLEN or length > available:
        raise PacketError(DropReason.UDP_MALFORMED, f"length {length} in {available} bytes")
    return src_port, dst_port, length, csum


def parse(packet: Ipv4Packet, verify: bool = True) -> UdpDatagram:
    """Validate and decode the UDP datagram carried by ``packet``.

    ``verify=False``: the checksum is partial (NEEDS_CSUM) and not checked.
    Raises :class:`PacketError` with ``UDP_MALFORMED`` or ``UDP_BAD_CHECKSUM``.
    """
    data = packet.payload
    src_port, dst_port, length, csum = _header(data)
    if verify and csum and not checksum.is_valid(
            data[:length], checksum.pseudo_header_v4(packet.src, packet.dst, IpProto.UDP, length)):
        raise PacketError(DropReason.UDP_BAD_CHECKSUM)
    return UdpDatagram(src_port, dst_port, data[UDP_HLEN:length])


def parse6(packet: Ipv6Packet, verify: bool = True) -> UdpDatagram:
    """Validate and decode the UDP datagram carried by IPv6 ``packet``.

    The checksum is mandatory in IPv6 (RFC 8200 section 8.1): 0 is refused.
    ``verify=False``: it is partial (NEEDS_CSUM) and not checked beyond that.
    Raises :class:`PacketError` with ``UDP_MALFORMED`` or ``UDP_BAD_CHECKSUM``.
    """
    data = packet.payload
    src_port, dst_port, length, csum = _header(data)
    if not csum or verify and not checksum.is_valid(
            data[:length], ipv6.pseudo_header(packet.src, packet.dst, NextHeader.UDP, length)):
        raise PacketError(DropReason.UDP_BAD_CHECKSUM)
    return UdpDatagram(src_port, dst_port, data[UDP_HLEN:length])


def build_frame(eth_dst: bytes, eth_src: bytes, ip_src: int, ip_dst: int, src_port: int,
                dst_port: int, payload: BytesLike, *, ttl: int = ipv4.DEFAULT_TTL, csum: bool = True) -> bytes:
    """Build a complete Ethernet/IPv4/UDP frame carrying ``payload``, checksums set.

    ``csum=False`` leaves the UDP checksum 0 ("none", for a DATA_VALID guest);
    the IPv4 header checksum is always computed.  Raises :class:`ValueError`
    for a payload over :data:`MAX_PAYLOAD` bytes (a caller bug, never guest input).
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"UDP payload of {len(payload)} bytes is too long")
    length = UDP_HLEN + len(payload)
    udp_csum = 0
    if csum:
        start = (checksum.pseudo_header_v4(ip_src, ip_dst, IpProto.UDP, length)
                 + src_port + dst_port + length)
        udp_csum = checksum.checksum(payload, start) or 0xFFFF
    headers = bytearray(FRAME_HEADERS_LEN)
    eth.pack_header_into(headers, 0, eth_dst, eth_src, eth.EtherType.IPV4)
    ipv4.pack_header_into(headers, eth.ETH_HLEN, ip_src, ip_dst, IpProto.UDP, length, ttl=ttl)
    HEADER.pack_into(headers, eth.ETH_HLEN + ipv4.IPV4_HLEN, src_port, dst_port, length, udp_csum)
    return b"".join((headers, payload))


def build_frame6(eth_dst: bytes, eth_src: bytes, ip_src: bytes, ip_dst: bytes, src_port: int,
                 dst_port: int, payload: BytesLike, csum: bool = True) -> bytes:
    """A complete Ethernet/IPv6/UDP frame carrying ``payload``, checksum set.

    ``csum=False`` (a DATA_VALID guest) puts :data:`UNCOMPUTED_CSUM6` in the
    field instead.  Raises ValueError for a payload that does not fit an IPv6
    payload length.
    """
    length = UDP_HLEN + len(payload)
    if length > ipv6.MAX_PAYLOAD:
        raise ValueError(f"UDP payload of {len(payload)} bytes is too long")
    udp_csum = UNCOMPUTED_CSUM6
    if csum:
        start = ipv6.pseudo_header(ip_src, ip_dst, NextHeader.UDP, length) + src_port + dst_port + length
        udp_csum = checksum.checksum(payload, start) or 0xFFFF
    headers = bytearray(FRAME6_HEADERS_LEN)
    eth.pack_header_into(headers, 0, eth_dst, eth_src, eth.EtherType.IPV6)
    ipv6.pack_header_into(headers, eth.ETH_HLEN, ip_src, ip_dst, NextHeader.UDP, length)
    HEADER.pack_into(headers, eth.ETH_HLEN + ipv6.IPV6_HLEN, src_port, dst_port, length, udp_csum)
    return b"".join((headers, payload))
