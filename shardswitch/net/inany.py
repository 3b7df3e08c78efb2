"""One address type for both IP families: passt's ``inany``.

Theory of operation.  Everything above the wire codecs - the flow table, the
worker's flow layer, the address translation between guest and host, the
frame builders of flows - handles an address as 16 bytes: an IPv6 address as
itself, an IPv4 address ``a.b.c.d`` as the IPv4-mapped ``::ffff:a.b.c.d``.
So a flow's sides, keys and lookups have one shape whatever the family, and
protocol code branches on the family only where the wire format differs
(which header to write), through :func:`is_v4`.

The helpers are pure and cheap: the per-packet ones are a slice compare or a
concatenation.  Values are plain ``bytes`` (:data:`InAny` is an alias for the
reader), never ``ipaddress`` objects on the packet path.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TypeAlias

#: A 16-byte address (IPv4 as IPv4-mapped IPv6).
InAny: TypeAlias = bytes

#: The first 12 bytes of an IPv4-mapped address.
V4_PREFIX = b"\x00" * 10 + b"\xff\xff"
#: The unspecified address of each family.
ANY6 = bytes(16)
ANY4 = V4_PREFIX + bytes(4)
#: The loopback address of each family (what mapped addresses stand for).
LOOPBACK4 = V4_PREFIX + b"\x7f\x00\x00\x01"
LOOPBACK6 = bytes(15) + b"\x01"


class AddressError(ValueError):
    """Text or bytes that are no IPv4 or IPv6 address."""


def is_v4(addr: InAny) -> bool:
    """True when ``addr`` is an IPv4 address (IPv4-mapped)."""
    return addr[:12] == V4_PREFIX


def from_v4(addr: int) -> InAny:
    """An IPv4 address given as an integer (the IPv4 codec's form)."""
    return V4_PREFIX + addr.to_bytes(4, "big")


def from_packed(addr: bytes) -> InAny:
    """An address given as 4 or 16 packed bytes."""
    if len(addr) == 4:
        return V4_PREFIX + bytes(addr)
    if len(addr) == 16:
        return bytes(addr)
    raise AddressError(f"an address is 4 or 16 bytes, not {len(addr)}")


def from_str(text: str) -> InAny:
    """An address in text form (``%zone`` suffixes are ignored; IPv4-mapped text stays IPv4)."""
    try:
        return from_packed(ipaddress.ip_address(text.split("%", 1)[0]).packed)
    except ValueError:
        raise AddressError(f"not an IPv4/IPv6 address: {text!r}") from None


def packed(addr: InAny) -> bytes:
    """The family's own form: 4 bytes for IPv4, 16 for IPv6."""
    return addr[12:] if addr[:12] == V4_PREFIX else addr


def v4_int(addr: InAny) -> int:
    """An IPv4 address as the IPv4 codec's integer."""
    return int.from_bytes(addr[12:], "big")


def to_str(addr: InAny) -> str:
    """Text form (dotted quad for IPv4)."""
    if addr[:12] == V4_PREFIX:
        return socket.inet_ntop(socket.AF_INET, addr[12:])
    return socket.inet_ntop(socket.AF_INET6, addr)


def family(addr: InAny) -> int:
    """The socket address family of ``addr``."""
    return socket.AF_INET if addr[:12] == V4_PREFIX else socket.AF_INET6


def is_loopback(addr: InAny) -> bool:
    """127.0.0.0/8 and ::1."""
    return addr[12] == 127 if addr[:12] == V4_PREFIX else addr == LOOPBACK6


def loopback_like(addr: InAny) -> InAny:
    """The loopback address of ``addr``'s family."""
    return LOOPBACK4 if addr[:12] == V4_PREFIX else LOOPBACK6


def sockaddr(addr: InAny, port: int) -> tuple[str, int]:
    """A socket address for ``connect``/``sendto`` in ``addr``'s family."""
    return to_str(addr), port
