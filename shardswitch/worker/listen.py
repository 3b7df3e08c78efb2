"""Listening sockets of forwarded ports (-t / -u), one per worker per port.

Every worker binds its own socket for each forwarded port with
``SO_REUSEPORT``: the kernel spreads incoming connections and datagrams
over the workers by their address hash, and the worker whose socket took
one owns the flow.  Without a bind address the socket is dual-stack
(``::`` with IPV6_V6ONLY off), falling back to ``0.0.0.0`` on hosts
without IPv6; ``ADDR%IF`` binds to the interface too.
"""

from __future__ import annotations

import errno
import socket

from shardswitch import portspec

#: Pending connections per TCP listener.
LISTEN_BACKLOG = 128


def bind_forward(fwd: portspec.Forward, port: int, kind: int) -> socket.socket:
    """A non-blocking listening socket of type ``kind`` (SOCK_STREAM or SOCK_DGRAM) on ``port`` of ``fwd``."""
    addr = fwd.addr
    if addr is None:
        try:
            return _bind_one(socket.AF_INET6, "::", port, fwd.ifname, kind, dual=True)
        except OSError as err:
            if err.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            addr = "0.0.0.0"
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return _bind_one(family, addr, port, fwd.ifname, kind, dual=False)


def _bind_one(family: int, addr: str, port: int, ifname: str | None, kind: int, dual: bool) -> socket.socket:
    """Create, configure and bind one socket (and listen, for TCP)."""
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        if ifname is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
