"""Test helpers for checksum offload: frames as a guest with VIRTIO_NET_F_CSUM sends them.

A Linux guest that leaves the checksum to the device (NEEDS_CSUM) puts only
the folded pseudo-header sum in the TCP/UDP checksum field; the device would
add the sum of the segment from ``csum_start`` on.  :func:`make_partial`
turns a frame with a full checksum into such a frame, and
:func:`needs_csum_header` builds the matching virtio-net header.
"""

from __future__ import annotations

import struct

from shardswitch.net import checksum, ipv6
from shardswitch.virtio.netdev import VNET_HDR, GsoType, VnetHdrFlags

_U16 = struct.Struct("!H")
#: Offset of the checksum inside the L4 header, by IP protocol.
CSUM_OFFSETS = {6: 16, 17: 6}


def l4_offsets(frame: bytes) -> tuple[int, int, int]:
    """(start of the L4 header, its checksum offset, the pseudo-header sum) of an IPv4/IPv6 TCP/UDP frame."""
    if frame[12:14] == b"\x86\xdd":
        start = 14 + 40
        proto = frame[14 + 6]
        pseudo = ipv6.pseudo_header(frame[22:38], frame[38:54], proto, len(frame) - start)
    else:
        start = 14 + (frame[14] & 0x0F) * 4
        proto = frame[14 + 9]
        pseudo = checksum.pseudo_header_v4(int.from_bytes(frame[26:30], "big"), int.from_bytes(frame[30:34], "big"),
                                           proto, len(frame) - start)
    return start, CSUM_OFFSETS[proto], pseudo


def make_partial(frame: bytes) -> bytes:
    """``frame`` with its L4 checksum replaced by the folded pseudo-header sum (what NEEDS_CSUM frames carry)."""
    start, offset, pseudo = l4_offsets(frame)
    out = bytearray(frame)
    _U16.pack_into(out, start + offset, checksum.ones_sum(b"", pseudo))
    return bytes(out)


def needs_csum_header(frame: bytes, gso: GsoType = GsoType.NONE, gso_size: int = 0, hdr_len: int = 12) -> bytes:
    """The virtio-net header of a NEEDS_CSUM ``frame`` (optionally a TSO segment)."""
    start, offset, _pseudo = l4_offsets(frame)
    header_len = start + 20 if gso != GsoType.NONE else 0
    return VNET_HDR.pack(VnetHdrFlags.NEEDS_CSUM, gso, header_len, gso_size, start, offset, 0)[:hdr_len]


def l4_checksum(frame: bytes) -> int:
    """The L4 checksum field of a TCP/UDP frame."""
    start, offset, _pseudo = l4_offsets(frame)
    return int(_U16.unpack_from(frame, start + offset)[0])
