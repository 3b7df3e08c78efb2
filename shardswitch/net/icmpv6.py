"""ICMPv6: validating parser, echo request/reply, and the frame builder NDP shares.

Theory of operation: :func:`parse` takes a validated :class:`Ipv6Packet`
whose next header is ICMPv6 (58) and checks that the message holds at least
the 8 bytes every ICMPv6 message has (Linux requires the same) and that its
checksum, computed over the RFC 8200 pseudo-header (source, destination,
upper-layer length, next header 58), header and body, is right.  ICMPv6
checksums are mandatory, so there is no "no checksum" value.  The result,
:class:`Icmpv6Message`, holds the type, the code and a zero-copy view of
the whole message; a dispatcher routes it by type: echo requests to the
ping relay (:func:`echo_of`), Neighbor Discovery (133-137) to
:class:`shardswitch.net.ndp.NdpResponder`, anything else (MLD reports,
error messages, ...) counted as ``ICMPV6_IGNORED``.  Such handlers have the
shape ``handler(eth_src: bytes, packet: Ipv6Packet, message:
Icmpv6Message, now: float, out: list[bytes]) -> None``.

Echo works as over IPv4 (see :mod:`shardswitch.net.icmp`, whose shared
helpers are used here): :func:`parse_echo` / :func:`echo_of` decode a
request, :func:`build_ping_request` and :func:`parse_ping_reply` talk to an
``IPPROTO_ICMPV6`` ping socket (the kernel computes the checksum and sets
the identifier), :func:`build_echo_reply_frame` makes the reply frame.

:func:`build_frame` wraps any ICMPv6 message in IPv6 and Ethernet headers:
the caller gives the message head (type, code, zero checksum, fixed part
and options) and optionally data to append; the checksum is computed over
the pseudo-header, the head (read as one integer, see
:mod:`shardswitch.net.checksum`) and the data, then patched into the head,
and everything is joined with the data copied once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from . import checksum, eth, icmp, ipv6
from .checksum import BytesLike
from .drop import DropReason, PacketError
from .icmp import ICMP_HLEN, Echo, PingReply
from .ipv6 import Ipv6Packet, NextHeader

__all__ = ["Echo", "Icmpv6Message", "Icmpv6Type", "PingReply", "build_echo_reply_frame",
           "build_frame", "build_ping_request", "echo_of", "parse", "parse_echo",
           "parse_ping_reply"]

#: Shortest ICMPv6 message: type, code, checksum and 4 bytes of body.
ICMPV6_MIN_LEN = ICMP_HLEN
#: Offset of the checksum in an ICMPv6 message.
CHECKSUM_OFFSET = 2
#: Bytes of Ethernet and IPv6 headers in front of an ICMPv6 message we build.
FRAME_HEADERS_LEN = eth.ETH_HLEN + ipv6.IPV6_HLEN
#: Largest ICMPv6 message :func:`build_frame` accepts (IPv6 payload length limit).
MAX_MESSAGE_LEN = ipv6.MAX_PAYLOAD
_U16 = struct.Struct("!H")


class Icmpv6Type(IntEnum):
    """ICMPv6 message types we handle or name in diagnostics."""

    DEST_UNREACH = 1
    PACKET_TOO_BIG = 2
    TIME_EXCEEDED = 3
    PARAMETER_PROBLEM = 4
    ECHO_REQUEST = 128
    ECHO_REPLY = 129
    MLD_QUERY = 130
    MLD_REPORT = 131
    MLD_DONE = 132
    ROUTER_SOLICITATION = 133
    ROUTER_ADVERTISEMENT = 134
    NEIGHBOR_SOLICITATION = 135
    NEIGHBOR_ADVERTISEMENT = 136
    REDIRECT = 137
    MLD2_REPORT = 143


#: The Neighbor Discovery message types (RFC 4861).
NDP_TYPES = frozenset(range(Icmpv6Type.ROUTER_SOLICITATION, Icmpv6Type.REDIRECT + 1))


@dataclass(slots=True)
class Icmpv6Message:
    """A checksum-verified ICMPv6 message; ``message`` points into the guest's frame."""

    #: Message type (see :class:`Icmpv6Type`).
    type: int
    #: Message code.
    code: int
    #: The whole message, header included, cut to the upper-layer length.
    message: memoryview


def parse(packet: Ipv6Packet) -> Icmpv6Message:
    """Validate the ICMPv6 message carried by ``packet`` (next header 58).

    Raises :class:`PacketError` with ``ICMPV6_MALFORMED`` or ``ICMPV6_BAD_CHECKSUM``.
    """
    data = packet.payload
    length = len(data)
    if length < ICMPV6_MIN_LEN:
        raise PacketError(DropReason.ICMPV6_MALFORMED, f"{length} bytes, shorter than a header")
    if not checksum.is_valid(data, ipv6.pseudo_header(packet.src, packet.dst, NextHeader.ICMPV6,
                                                      length)):
        raise PacketError(DropReason.ICMPV6_BAD_CHECKSUM)
    return Icmpv6Message(data[0], data[1], data)


def echo_of(message: Icmpv6Message) -> Echo | None:
    """The echo request in a parsed message, or None for other types.

    Raises :class:`PacketError` (``ICMPV6_MALFORMED``) for a non-zero code.
    """
    return icmp.echo_request(message.message, Icmpv6Type.ECHO_REQUEST,
                             DropReason.ICMPV6_MALFORMED)


def parse_echo(packet: Ipv6Packet) -> Echo | None:
    """The echo request carried by ``packet`` (next header 58), or None for other types.

    Raises :class:`PacketError` with ``ICMPV6_MALFORMED`` or ``ICMPV6_BAD_CHECKSUM``.
    """
    return echo_of(parse(packet))


def build_frame(eth_dst: bytes, eth_src: bytes, src: bytes, dst: bytes, head: BytesLike,
                data: BytesLike = b"", *, hop_limit: int = ipv6.DEFAULT_HOP_LIMIT) -> bytes:
    """Build a complete Ethernet/IPv6/ICMPv6 frame for the message ``head`` + ``data``.

    ``head`` starts with type and code, has an even length of at least 4
    and its checksum field is ignored (overwritten).  Raises
    :class:`ValueError` for an odd or short head or a message over
    :data:`MAX_MESSAGE_LEN` bytes (caller bugs, never guest input).
    """
    head_len = len(head)
    length = head_len + len(data)
    if head_len < 4 or head_len & 1:
        raise ValueError(f"ICMPv6 message head of {head_len} bytes")
    if length > MAX_MESSAGE_LEN:
        raise ValueError(f"ICMPv6 message of {length} bytes is too long")
    headers = bytearray(FRAME_HEADERS_LEN + head_len)
    headers[FRAME_HEADERS_LEN:] = head
    _U16.pack_into(headers, FRAME_HEADERS_LEN + CHECKSUM_OFFSET, 0)
    start = (ipv6.pseudo_header(src, dst, NextHeader.ICMPV6, length)
             + int.from_bytes(headers[FRAME_HEADERS_LEN:], "big"))
    _U16.pack_into(headers, FRAME_HEADERS_LEN + CHECKSUM_OFFSET, checksum.checksum(data, start))
    eth.pack_header_into(headers, 0, eth_dst, eth_src, eth.EtherType.IPV6)
    ipv6.pack_header_into(headers, eth.ETH_HLEN, src, dst, NextHeader.ICMPV6, length,
                          hop_limit=hop_limit)
    return b"".join((headers, data)) if data else bytes(headers)


def build_echo_reply_frame(eth_dst: bytes, eth_src: bytes, src_ip: bytes, dst_ip: bytes,
                           ident: int, seq: int, data: BytesLike, *,
                           hop_limit: int = ipv6.DEFAULT_HOP_LIMIT) -> bytes:
    """Build a complete Ethernet/IPv6/ICMPv6 echo reply frame, checksum set.

    ``data`` is the echo data after the 8-byte header.  Raises
    :class:`ValueError` when the message would exceed 65535 bytes.
    """
    head = icmp.ECHO_HEADER.pack(Icmpv6Type.ECHO_REPLY, 0, 0, ident, seq)
    return build_frame(eth_dst, eth_src, src_ip, dst_ip, head, data, hop_limit=hop_limit)


def build_ping_request(ident: int, seq: int, data: BytesLike) -> bytes:
    """What to ``send()`` on an ICMPv6 ping socket (the kernel sets identifier and checksum)."""
    return icmp.build_ping_request(ident, seq, data, request_type=Icmpv6Type.ECHO_REQUEST)


def parse_ping_reply(data: BytesLike) -> PingReply | None:
    """Decode what ``recv()`` returned on an ICMPv6 ping socket (same layout as ICMP)."""
    return icmp.parse_ping_reply(data)


#: Most bytes of the offending packet an ICMPv6 error quotes (the message fits the minimum MTU, RFC 4443 2.4).
MAX_QUOTE = ipv6.MIN_MTU - ipv6.IPV6_HLEN - ICMP_HLEN
_ERROR_HEAD = struct.Struct("!BBHI")


def build_error_frame(eth_dst: bytes, eth_src: bytes, src: bytes, dst: bytes, icmp_type: int, code: int,
                      info: int, quoted: BytesLike) -> bytes:
    """A complete Ethernet/IPv6/ICMPv6 error frame (destination unreachable, packet too big...).

    ``quoted`` is the start of the packet the error is about, IPv6 header
    first, cut at :data:`MAX_QUOTE` bytes; ``info`` fills the 32 bits after
    the checksum (the MTU of "packet too big", 0 otherwise).
    """
    return build_frame(eth_dst, eth_src, src, dst, _ERROR_HEAD.pack(icmp_type, code, 0, info),
                       quoted[:MAX_QUOTE])
