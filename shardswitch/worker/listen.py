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
import functools
import logging
import socket
from dataclasses import dataclass
from typing import Callable

from shardswitch import portspec
from shardswitch.shm.layout import ip16

log = logging.getLogger("shardswitch.worker")

#: Pending connections per TCP listener.
LISTEN_BACKLOG = 128


@dataclass(slots=True)
class Listener:
    """This worker's listening socket of one forwarded port."""

    sock: socket.socket
    port: int
    guest_port: int
    #: The address it is bound to, as 16 bytes (for the flow table).
    bound: bytes


def open_listeners(forwards: list[portspec.Forward], kind: int, option: str, pair: int,
                   watch: Callable[[int, Callable[[], None]], None],
                   on_readable: Callable[[int], None]) -> dict[int, Listener]:
    """Bind this worker's socket for every port of ``forwards`` and watch it; by descriptor.

    A port that cannot be bound is logged (naming ``option``, -t or -u) and
    skipped: the other ports still work.
    """
    listeners: dict[int, Listener] = {}
    for fwd in forwards:
        for port in fwd.ports():
            try:
                sock = bind_forward(fwd, port, kind)
            except OSError as err:
                log.error("worker %d: %s port %d: %s", pair, option, port, err.strerror)
                continue
            fd = sock.fileno()
            address = sock.getsockname()[0]
            listeners[fd] = Listener(sock, port, fwd.guest_port(port), ip16(address.split("%")[0]))
            watch(fd, functools.partial(on_readable, fd))
            log.debug("worker %d: %s port %d (to guest port %d) on %s", pair, option, port, fwd.guest_port(port),
                      address)
    return listeners


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
