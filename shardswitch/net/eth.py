"""Ethernet II headers and MAC address helpers.

Theory of operation: a frame from the guest starts with a 14-byte Ethernet II
header (destination MAC, source MAC, EtherType; no 802.1Q handling: tagged
frames are reported as an unhandled EtherType).  :func:`parse_header` checks
the length and returns the three fields as a plain tuple (no object per
frame); :func:`pack_header_into` writes a header into a caller's buffer for
replies.  MAC addresses are 6-byte ``bytes`` internally and converted from
and to the usual ``aa:bb:cc:dd:ee:ff`` text only at configuration and
display time.

Frames are not padded to the 60-byte Ethernet minimum in either direction:
virtio-net carries frames of any length, guests do not pad what they send,
and Linux accepts short replies (passt does not pad either).
"""

from __future__ import annotations

import string
import struct
from enum import IntEnum

from .checksum import BytesLike
from .drop import DropReason, PacketError

#: Length of a MAC address.
ETH_ALEN = 6
#: Length of an Ethernet II header.
ETH_HLEN = 14
#: The broadcast MAC address.
BROADCAST_MAC = b"\xff" * ETH_ALEN
#: The all-zeros MAC address (never a valid source).
ZERO_MAC = bytes(ETH_ALEN)

#: Destination, source, EtherType.
HEADER = struct.Struct("!6s6sH")
assert HEADER.size == ETH_HLEN


class EtherType(IntEnum):
    """EtherType values we dispatch on or name in diagnostics."""

    IPV4 = 0x0800
    ARP = 0x0806
    VLAN = 0x8100
    IPV6 = 0x86DD
    QINQ = 0x88A8


def parse_header(frame: BytesLike) -> tuple[bytes, bytes, int]:
    """Return ``(destination, source, ethertype)`` of a frame.

    Raises :class:`PacketError` (``TRUNCATED``) when the frame is shorter
    than an Ethernet header.
    """
    if len(frame) < ETH_HLEN:
        raise PacketError(DropReason.TRUNCATED, f"{len(frame)}-byte frame")
    dst, src, ethertype = HEADER.unpack_from(frame)
    return dst, src, ethertype


def pack_header_into(buf: bytearray | memoryview, offset: int, dst: bytes, src: bytes,
                     ethertype: int) -> None:
    """Write an Ethernet II header into ``buf`` at ``offset``."""
    HEADER.pack_into(buf, offset, dst, src, ethertype)


def is_multicast(mac: BytesLike) -> bool:
    """True for group addresses (multicast and broadcast): the I/G bit is set."""
    return bool(mac[0] & 1)


def is_valid_source(mac: bytes) -> bool:
    """True when ``mac`` may appear as the source of a frame (unicast, not zero)."""
    return not mac[0] & 1 and mac != ZERO_MAC


def mac_from_str(text: str) -> bytes:
    """Parse ``aa:bb:cc:dd:ee:ff`` (``-`` also accepted) into 6 bytes.

    Raises :class:`ValueError` for anything else.
    """
    parts = text.replace("-", ":").split(":")
    if len(parts) != ETH_ALEN or not all(
            1 <= len(p) <= 2 and all(c in string.hexdigits for c in p) for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def mac_to_str(mac: BytesLike) -> str:
    """Format 6 bytes as ``aa:bb:cc:dd:ee:ff``."""
    return ":".join(f"{b:02x}" for b in bytes(mac))
