"""Listening sockets of forwarded ports (-t / -u), one per worker per port.

Every worker has its own socket for each forwarded port, bound with
``SO_REUSEPORT``: the kernel spreads incoming connections and datagrams
over the workers by their address hash, and the worker whose socket took
one owns the flow.  Without a bind address the socket is dual-stack
(``::`` with IPV6_V6ONLY off), falling back to ``0.0.0.0`` on hosts
without IPv6; ``ADDR%IF`` binds to the interface too.

The coordinator binds them all (:func:`bind_all`, :func:`bind_copies`)
before it gives up root (a port below 1024 needs it), keeps them while
their rule lasts and forks each worker with its own set, described by
:class:`~shardswitch.ipc.PortFd`; the worker adopts them
(:func:`adopt_listeners`).  Rules added at run time
(``shardswitch forward add``) are bound the same way, without root, and
sent to the running workers.  A replacement worker inherits the sockets of
the rules in force, so connections that queued while its predecessor died
are still there.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from dataclasses import dataclass
from typing import Callable

from shardswitch import portspec
from shardswitch.ipc import PortFd
from shardswitch.shm.layout import ip16

log = logging.getLogger("shardswitch.worker")

#: Pending connections per TCP listener.
LISTEN_BACKLOG = 128
#: linux/in.h and linux/in6.h: bind to an address not (yet) on the host (Python's socket module lacks them).
IP_FREEBIND = 15
IPV6_FREEBIND = 78


@dataclass(slots=True)
class Listener:
    """This worker's listening socket of one forwarded port."""

    sock: socket.socket
    port: int
    guest_port: int
    #: The address it is bound to, as 16 bytes (for the flow table).
    bound: bytes
    #: The address inside the guest its flows go to, 16 bytes (None: the guest's own address).
    target: bytes | None = None
    #: The forwarding rule it belongs to.
    rule: int = 0


def bind_all(specs: tuple[str, ...], kind: int, option: str, copies: int) -> list[list[tuple[socket.socket, PortFd]]]:
    """``copies`` sockets (one per worker) for every port of ``specs``, with their descriptions; per copy.

    A port that cannot be bound is logged once (naming ``option``, -t or -u)
    and skipped: the other ports still work.  Raises ConfigError
    (portspec) for a bad spec.
    """
    per_copy: list[list[tuple[socket.socket, PortFd]]] = [[] for _ in range(copies)]
    if not specs:
        return per_copy
    for fwd in portspec.parse_all(specs, option, portspec.read_ephemeral()):
        for port in fwd.ports():
            try:
                bound = bind_copies(fwd, port, kind, copies)
            except OSError as err:
                log.error("%s port %d: %s", option, port, err.strerror)
                continue
            for copy, sock in zip(per_copy, bound):
                copy.append((sock, describe(sock, fwd, port)))
    return per_copy


def bind_copies(fwd: portspec.Forward, port: int, kind: int, copies: int, freebind: bool = False) -> list[socket.socket]:
    """``copies`` listening sockets of ``port`` of ``fwd`` (all or none: OSError closes those made)."""
    bound: list[socket.socket] = []
    try:
        for _ in range(copies):
            bound.append(bind_forward(fwd, port, kind, freebind))
    except OSError:
        for sock in bound:
            sock.close()
        raise
    log.debug("port %d (to guest port %d%s) on %s", port, fwd.guest_port(port),
              f" at {fwd.to_addr}" if fwd.to_addr else "", bound[0].getsockname()[0] if bound else "-")
    return bound


def describe(sock: socket.socket, fwd: portspec.Forward, port: int, rule: int = 0) -> PortFd:
    """The description of ``sock``, a listening socket of ``port`` of ``fwd`` (rule number ``rule``)."""
    address = sock.getsockname()[0]
    target = ip16(fwd.to_addr) if fwd.to_addr is not None else b""
    return PortFd(sock.fileno(), port, fwd.guest_port(port), ip16(address.split("%")[0]), target, rule)


def adopt_listeners(ports: tuple[PortFd, ...], watch: Callable[[int, Callable[[], None]], None],
                    on_readable: Callable[[int], None]) -> dict[int, Listener]:
    """This worker's sockets of ``ports`` (inherited descriptors), watched; by descriptor."""
    listeners: dict[int, Listener] = {}
    for desc in ports:
        sock = socket.socket(fileno=desc.fd)
        listeners[desc.fd] = Listener(sock, desc.port, desc.guest_port, desc.bound, desc.target or None, desc.rule)
        watch(desc.fd, functools.partial(on_readable, desc.fd))
    return listeners


def bind_forward(fwd: portspec.Forward, port: int, kind: int, freebind: bool = False) -> socket.socket:
    """A non-blocking listening socket of type ``kind`` (SOCK_STREAM or SOCK_DGRAM) on ``port`` of ``fwd``;
    ``freebind`` (--freebind): its address may be one the host does not have (yet)."""
    addr = fwd.addr
    if addr is None:
        try:
            return _bind_one(socket.AF_INET6, "::", port, fwd.ifname, kind, dual=True, freebind=freebind)
        except OSError as err:
            if err.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            addr = "0.0.0.0"
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return _bind_one(family, addr, port, fwd.ifname, kind, dual=False, freebind=freebind)


def _bind_one(family: int, addr: str, port: int, ifname: str | None, kind: int, dual: bool,
              freebind: bool = False) -> socket.socket:
    """Create, configure and bind one socket (and listen, for TCP)."""
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if freebind:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
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
