"""ICMP errors queued on host sockets (IP_RECVERR / IPV6_RECVERR), read for relaying to the guest.

Theory of operation.  When a datagram a host socket sent draws an ICMP error
(port unreachable from the host's loopback, host unreachable from a router,
fragmentation needed...), Linux with ``IP_RECVERR`` set (``IPV6_RECVERR`` for
IPv6) keeps the details on the socket's error queue instead of only a bare
``ECONNREFUSED``.  ``recvmsg(MSG_ERRQUEUE)`` returns the offending
datagram's payload and a control message holding a ``sock_extended_err``::

    u32 ee_errno, u8 ee_origin, u8 ee_type, u8 ee_code, u8 ee_pad,
    u32 ee_info, u32 ee_data, then the offender's socket address

``ee_origin`` says whether an ICMP (2) or ICMPv6 (3) message caused it,
``ee_type`` / ``ee_code`` are that message's, ``ee_info`` the MTU of a
"fragmentation needed" / "packet too big", and the offender is who sent the
ICMP error.  :func:`read_errors` drains the queue into :class:`SockError`
values; the UDP flows turn each into an ICMP error frame for the guest.  A
queued error also makes the socket report EPOLLERR, so the queue must be
drained whenever the socket's callback runs, or the worker would be woken
again and again.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from enum import IntEnum

#: Socket options and control message types (linux/in.h, linux/in6.h; not in Python's socket module).
IP_RECVERR = 11
IPV6_RECVERR = 25
#: struct sock_extended_err without the offender address that follows it.
EXTENDED_ERR = struct.Struct("=IBBBBII")
assert EXTENDED_ERR.size == 16
#: sockaddr_in / sockaddr_in6 of the offender: family (host order), port, then the address.
_SOCKADDR_HEAD = struct.Struct("=HH")
_ADDR4_AT, _ADDR6_AT = 4, 8
#: Room for the control message: the structure plus a sockaddr_in6.
_CMSG_SPACE = socket.CMSG_SPACE(EXTENDED_ERR.size + 28)
#: Errors read per call at most (the queue is bounded by the socket's buffer anyway).
MAX_ERRORS = 64


class EeOrigin(IntEnum):
    """``sock_extended_err.ee_origin``: what produced the error."""

    NONE = 0
    LOCAL = 1
    ICMP = 2
    ICMP6 = 3


@dataclass(frozen=True, slots=True)
class SockError:
    """One queued error: the ICMP message that caused it and the start of the datagram it is about."""

    origin: int
    icmp_type: int
    code: int
    info: int
    #: Who sent the ICMP error (4 or 16 bytes), or None when the kernel gave no address.
    offender: bytes | None
    #: The payload of the datagram the error is about, as much as was read.
    payload: bytes


def enable(sock: socket.socket, v6: bool) -> None:
    """Queue ICMP errors about ``sock``'s datagrams (raises OSError)."""
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def parse(level: int, kind: int, data: bytes, payload: bytes) -> SockError | None:
    """The error in one control message, or None for any other message (or a short one)."""
    if (level, kind) not in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
        return None
    if len(data) < EXTENDED_ERR.size:
        return None
    _errno, origin, icmp_type, code, _pad, info, _data = EXTENDED_ERR.unpack_from(data)
    offender: bytes | None = None
    at = EXTENDED_ERR.size
    if len(data) >= at + _SOCKADDR_HEAD.size:
        family = _SOCKADDR_HEAD.unpack_from(data, at)[0]
        if family == socket.AF_INET and len(data) >= at + _ADDR4_AT + 4:
            offender = bytes(data[at + _ADDR4_AT:at + _ADDR4_AT + 4])
        elif family == socket.AF_INET6 and len(data) >= at + _ADDR6_AT + 16:
            offender = bytes(data[at + _ADDR6_AT:at + _ADDR6_AT + 16])
    return SockError(origin, icmp_type, code, info, offender, payload)


def read_errors(sock: socket.socket, max_payload: int) -> list[SockError]:
    """Drain ``sock``'s error queue; each error with up to ``max_payload`` bytes of its datagram."""
    errors: list[SockError] = []
    for _ in range(MAX_ERRORS):
        try:
            payload, ancdata, _flags, _addr = sock.recvmsg(max_payload, _CMSG_SPACE, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        for level, kind, data in ancdata:
            error = parse(level, kind, data, payload)
            if error is not None:
                errors.append(error)
    return errors
