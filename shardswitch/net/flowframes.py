"""Frames to the guest for flows, addressed with 16-byte addresses of either family.

Theory of operation.  The flow layer and the protocol modules of the worker
hold every address as an :mod:`~shardswitch.net.inany` value.  The builders
here take those as they are and pick the wire format from the address: an
IPv4-mapped source gives an IPv4 frame (ICMP for errors and echo), any other
an IPv6 one (ICMPv6).  This is the one place where a flow's frames branch on
the family; the codecs underneath (:mod:`~shardswitch.net.udp`,
:mod:`~shardswitch.net.icmp`, :mod:`~shardswitch.net.icmpv6`) keep the
wire-native forms.  Pure functions: bytes in, a complete Ethernet frame out.
"""

from __future__ import annotations

from . import eth, icmp, icmpv6, udp
from .checksum import BytesLike
from .inany import V4_PREFIX, InAny


def udp_headers_len(addr: InAny) -> int:
    """Header bytes in front of the payload of a UDP frame between addresses of ``addr``'s family."""
    return udp.FRAME_HEADERS_LEN if addr[:12] == V4_PREFIX else udp.FRAME6_HEADERS_LEN


def icmp_max_quote(addr: InAny) -> int:
    """Most bytes an ICMP (or ICMPv6) error quotes in ``addr``'s family."""
    return icmp.MAX_QUOTE if addr[:12] == V4_PREFIX else icmpv6.MAX_QUOTE


def udp_frame(eth_dst: bytes, eth_src: bytes, src: InAny, dst: InAny, src_port: int, dst_port: int,
              payload: BytesLike, csum: bool = True) -> bytes:
    """A complete UDP frame ``src``:``src_port`` -> ``dst``:``dst_port``.

    ``csum=False`` (a DATA_VALID guest) leaves the UDP checksum uncomputed.
    """
    if src[:12] == V4_PREFIX:
        return udp.build_frame(eth_dst, eth_src, int.from_bytes(src[12:], "big"), int.from_bytes(dst[12:], "big"),
                               src_port, dst_port, payload, csum=csum)
    return udp.build_frame6(eth_dst, eth_src, src, dst, src_port, dst_port, payload, csum)


def echo_reply_frame(eth_dst: bytes, eth_src: bytes, src: InAny, dst: InAny, ident: int, seq: int,
                     data: BytesLike) -> bytes:
    """A complete ICMP (IPv4) or ICMPv6 echo reply frame."""
    if src[:12] == V4_PREFIX:
        return icmp.build_echo_reply_frame(eth_dst, eth_src, int.from_bytes(src[12:], "big"),
                                           int.from_bytes(dst[12:], "big"), ident, seq, data)
    return icmpv6.build_echo_reply_frame(eth_dst, eth_src, src, dst, ident, seq, data)


def icmp_error_frame(eth_dst: bytes, eth_src: bytes, src: InAny, dst: InAny, icmp_type: int, code: int,
                     info: int, quoted: BytesLike) -> bytes:
    """A complete ICMP or ICMPv6 error frame quoting ``quoted`` (the offending packet, IP header first).

    ``info`` is the 32 bits after the checksum (next-hop MTU or MTU; for IPv4
    only its low 16 bits are used).
    """
    if src[:12] == V4_PREFIX:
        return icmp.build_error_frame(eth_dst, eth_src, int.from_bytes(src[12:], "big"),
                                      int.from_bytes(dst[12:], "big"), icmp_type, code, info & 0xFFFF, quoted)
    return icmpv6.build_error_frame(eth_dst, eth_src, src, dst, icmp_type, code, info, quoted)


def quoted_udp(eth_dst: bytes, eth_src: bytes, src: InAny, dst: InAny, src_port: int, dst_port: int,
               payload: BytesLike) -> bytes:
    """The IP packet of a UDP datagram as it was sent (for an ICMP error to quote), checksum set."""
    return udp_frame(eth_dst, eth_src, src, dst, src_port, dst_port, payload)[eth.ETH_HLEN:]
