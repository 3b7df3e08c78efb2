"""ICMP echo over IPv4: guest request parser, reply builder, ping-socket helpers.

Theory of operation (as passt's icmp.c): the guest's echo requests are not
answered here but relayed to the host through an unprivileged "ping socket"
(``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``, one per guest identifier),
and whatever echo replies the host kernel hands back are turned into frames
for the guest.  This module is the packet half of that relay; the sockets
and the flow table belong to the worker.

* :func:`parse_echo` takes a validated :class:`Ipv4Packet` of protocol ICMP,
  checks that the 8-byte ICMP header fits and that the checksum over the
  whole message is right, and returns :class:`Echo` (identifier, sequence,
  zero-copy view of the data) for an echo request, None for every other
  ICMP type (the caller counts those as ``ICMP_IGNORED``).  An echo
  request with a non-zero code is malformed (RFC 792; Linux ping sockets
  refuse to send one).
* :func:`build_ping_request` makes what to ``send()`` on a ping socket: the
  8-byte echo request header and the data.  Its checksum is left 0 and its
  identifier is not used: Linux fills in both.  ``ping_v4_sendmsg()`` in
  net/ipv4/ping.c copies only type, code and sequence from the caller's
  header (``ping_common_sendmsg()`` rejects anything but an echo request
  with code 0), sets ``checksum = 0`` and ``id = inet_sport`` (the ping
  socket's bound identifier), and ``ping_v4_push_pending_frames()``
  computes the checksum; ``ping_v6_sendmsg()`` in net/ipv6/ping.c does the
  same for ICMPv6 (checksum by ``icmpv6_push_pending_frames()``).  The
  tests check this against a real ping socket in a private network
  namespace.
* :func:`parse_ping_reply` decodes what ``recv()`` on a ping socket returns
  (ICMP header and data, no IP header, the kernel's identifier) into
  :class:`PingReply` (type, code, sequence, data view), so the caller can
  re-stamp the guest's identifier with :func:`build_echo_reply_frame`.
  The layout is the same for ICMPv6, so :mod:`shardswitch.net.icmpv6` uses
  these helpers too (:func:`echo_request` is the shared decoder).

The reply frame is built like a UDP frame: Ethernet, IPv4 and ICMP headers
are packed into one small buffer and joined with the data, which is copied
exactly once; the ICMP checksum is computed over the header words (given as
a ``start`` value) and the data without materialising the message.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

from . import checksum, eth, ipv4
from .checksum import BytesLike
from .drop import DropReason, PacketError
from .ipv4 import IpProto, Ipv4Packet

#: Type, code, checksum, identifier, sequence number (ICMP and ICMPv6 echo).
ECHO_HEADER = struct.Struct("!BBHHH")
#: Length of an ICMP header (all ICMPv4 messages have at least this).
ICMP_HLEN = ECHO_HEADER.size
assert ICMP_HLEN == 8
#: Bytes of Ethernet, IPv4 and ICMP headers in front of the echo data we build.
FRAME_HEADERS_LEN = eth.ETH_HLEN + ipv4.IPV4_HLEN + ICMP_HLEN
#: Largest echo data :func:`build_echo_reply_frame` accepts (IPv4 total length limit).
MAX_ECHO_DATA = 0xFFFF - ipv4.IPV4_HLEN - ICMP_HLEN


class IcmpType(IntEnum):
    """ICMP (IPv4) message types we handle or name in diagnostics."""

    ECHO_REPLY = 0
    DEST_UNREACH = 3
    REDIRECT = 5
    ECHO_REQUEST = 8
    TIME_EXCEEDED = 11
    PARAMETER_PROBLEM = 12


class Echo(NamedTuple):
    """An echo request from the guest; ``payload`` points into its frame."""

    #: Identifier chosen by the guest.
    ident: int
    #: Sequence number.
    seq: int
    #: The data after the 8-byte header.
    payload: memoryview


class PingReply(NamedTuple):
    """What a ping socket returned; ``payload`` points into the receive buffer."""

    #: ICMP (or ICMPv6) type; an echo reply unless the kernel changes its habits.
    type: int
    #: ICMP code.
    code: int
    #: Sequence number (the identifier is the kernel's, so it is not returned).
    seq: int
    #: The data after the 8-byte header.
    payload: memoryview


def echo_request(message: memoryview, request_type: int, malformed: DropReason) -> Echo | None:
    """Decode ``message`` (an ICMP or ICMPv6 message, checksum verified) as an echo request.

    Returns None when its type is not ``request_type``.  Raises
    :class:`PacketError` with ``malformed`` when it is shorter than the
    8-byte echo header or its code is not 0.
    """
    if len(message) < 1 or message[0] != request_type:
        return None
    if len(message) < ICMP_HLEN:
        raise PacketError(malformed, f"{len(message)}-byte echo request")
    _type, code, _csum, ident, seq = ECHO_HEADER.unpack_from(message)
    if code:
        raise PacketError(malformed, f"echo request with code {code}")
    return Echo(ident, seq, message[ICMP_HLEN:])


def parse_echo(packet: Ipv4Packet) -> Echo | None:
    """The echo request carried by ``packet`` (protocol ICMP), or None for other ICMP types.

    Raises :class:`PacketError` with ``ICMP_MALFORMED`` or ``ICMP_BAD_CHECKSUM``.
    """
    message = packet.payload
    if len(message) < ICMP_HLEN:
        raise PacketError(DropReason.ICMP_MALFORMED, f"{len(message)} bytes, shorter than a header")
    if not checksum.is_valid(message):
        raise PacketError(DropReason.ICMP_BAD_CHECKSUM)
    return echo_request(message, IcmpType.ECHO_REQUEST, DropReason.ICMP_MALFORMED)


def echo_header_sum(kind: int, ident: int, seq: int) -> int:
    """A ``start`` value for the checksum: the words of an echo header with code 0."""
    return (kind << 8) + ident + seq


def build_echo_reply_frame(eth_dst: bytes, eth_src: bytes, src_ip: int, dst_ip: int, ident: int,
                           seq: int, data: BytesLike, *, ttl: int = ipv4.DEFAULT_TTL) -> bytes:
    """Build a complete Ethernet/IPv4/ICMP echo reply frame, checksums set.

    ``data`` is the echo data after the 8-byte header (e.g. the
    :attr:`PingReply.payload` of a ping socket reply).  Raises
    :class:`ValueError` for data over :data:`MAX_ECHO_DATA` bytes (a caller
    bug, never guest input).
    """
    if len(data) > MAX_ECHO_DATA:
        raise ValueError(f"ICMP echo data of {len(data)} bytes is too long")
    csum = checksum.checksum(data, echo_header_sum(IcmpType.ECHO_REPLY, ident, seq))
    headers = bytearray(FRAME_HEADERS_LEN)
    eth.pack_header_into(headers, 0, eth_dst, eth_src, eth.EtherType.IPV4)
    ipv4.pack_header_into(headers, eth.ETH_HLEN, src_ip, dst_ip, IpProto.ICMP,
                          ICMP_HLEN + len(data), ttl=ttl)
    ECHO_HEADER.pack_into(headers, eth.ETH_HLEN + ipv4.IPV4_HLEN, IcmpType.ECHO_REPLY, 0, csum,
                          ident, seq)
    return b"".join((headers, data))


def build_ping_request(ident: int, seq: int, data: BytesLike, *,
                       request_type: int = IcmpType.ECHO_REQUEST) -> bytes:
    """What to ``send()`` on a ping socket: echo request header (checksum 0) and ``data``.

    The kernel replaces ``ident`` with the socket's identifier and computes
    the checksum (see the module docstring).  ``request_type`` is 128 for
    ICMPv6 ping sockets.
    """
    return b"".join((ECHO_HEADER.pack(request_type, 0, 0, ident, seq), data))


def parse_ping_reply(data: BytesLike) -> PingReply | None:
    """Decode what ``recv()`` returned on a ping socket (ICMP or ICMPv6).

    Returns None when it is shorter than an 8-byte header.  The caller
    checks :attr:`PingReply.type` (echo reply: 0, or 129 for ICMPv6).
    """
    if len(data) < ICMP_HLEN:
        return None
    kind, code, _csum, _ident, seq = ECHO_HEADER.unpack_from(data)
    return PingReply(kind, code, seq, memoryview(data)[ICMP_HLEN:])


#: Most bytes of the offending datagram an ICMP error quotes (576-byte messages, RFC 1812 4.3.2.3).
MAX_QUOTE = 576 - ipv4.IPV4_HLEN - ICMP_HLEN
#: An error message's header: type, code, checksum, then 32 bits that depend on the type.
ERROR_HEADER = struct.Struct("!BBHI")


def build_error_frame(eth_dst: bytes, eth_src: bytes, src_ip: int, dst_ip: int, icmp_type: int, code: int,
                      info: int, quoted: BytesLike) -> bytes:
    """A complete Ethernet/IPv4/ICMP error frame (destination unreachable, time exceeded...).

    ``quoted`` is the start of the datagram the error is about, IP header
    first; it is cut at :data:`MAX_QUOTE` bytes.  ``info`` fills the 32
    bits after the checksum (the next-hop MTU of "fragmentation needed" in
    its low 16 bits, 0 otherwise).
    """
    quoted = quoted[:MAX_QUOTE]
    message = bytearray(ICMP_HLEN + len(quoted))
    message[ICMP_HLEN:] = quoted
    ERROR_HEADER.pack_into(message, 0, icmp_type, code, 0, info)
    ERROR_HEADER.pack_into(message, 0, icmp_type, code, checksum.checksum(message), info)
    headers = bytearray(eth.ETH_HLEN + ipv4.IPV4_HLEN)
    eth.pack_header_into(headers, 0, eth_dst, eth_src, eth.EtherType.IPV4)
    ipv4.pack_header_into(headers, eth.ETH_HLEN, src_ip, dst_ip, IpProto.ICMP, len(message))
    return bytes(headers + message)
