"""Address translation between the guest's view and the host's: passt's fwd.c.

Theory of operation.  The guest sees one network; the host sockets that carry
its flows see another.  Every protocol asks this module, in both directions,
instead of building the mapping itself:

* guest -> host (:meth:`Forwarding.to_host`): where a flow the guest starts
  really goes.  A DNS forwarding address (``--dns-forward``, or the gateway
  on hosts whose resolvers are on their loopback) on port 53 means the host
  resolver paired with it (chosen by :mod:`shardswitch.guest_addressing`).  A destination that is a *mapped* address
  (``--map-host-loopback``, the gateways by default) means the host itself:
  the host's loopback of that family.  ``--map-guest-addr`` means the host's
  own address that the guest's address (mirrored from the host) shadows.
  Anything else goes where the guest sent it.
* the host socket of a flow the guest starts (:meth:`Forwarding.bind_outbound`):
  bound to ``-o``'s source address and ``--outbound-if4/6``'s interface of
  its family, unless it goes to the host's loopback (which no interface
  binding could reach).
* host -> guest (:meth:`Forwarding.seen_from`): the address a host client of
  a forwarded port (``-t``/``-u``) appears to come from.  A client on the
  host's loopback appears as the first mapped address of its family (the
  reverse of the mapping above; None when there is none); a client on the
  host's own address shadowed by the guest's appears as ``--map-guest-addr``,
  else as a loopback client would (the guest must never see its own address
  as a source); others as themselves.
* the guest's own address as a forwarded flow's target
  (:meth:`Forwarding.guest_address`): its IPv4 address, and for IPv6 the
  global address it last used (learnt from the flows it starts, on any
  worker: the worker that learns a new one publishes it in the shared flow
  table's header, so a forwarded connection that lands on another worker
  reaches the guest's SLAAC address too), else the configured one, else its
  link-local address from its MAC.

Addresses are 16-byte :mod:`~shardswitch.net.inany` values throughout; the
flow's socket and frame builders take them as they are.
"""

from __future__ import annotations

import socket
from typing import Protocol

from shardswitch.ipc import ForwardSetup
from shardswitch.net import inany, ipv6
from shardswitch.net.inany import InAny
from shardswitch.worker.port import WorkerPort

#: The DNS port.
DNS_PORT = 53


def _parse_all(texts: tuple[str, ...]) -> list[InAny]:
    """The valid addresses among ``texts``, in order (bad ones are skipped)."""
    parsed = []
    for text in texts:
        try:
            parsed.append(inany.from_str(text))
        except inany.AddressError:
            continue
    return parsed


class SharedGuest6(Protocol):
    """Where workers share the guest's global IPv6 address (:class:`~shardswitch.shm.table.FlowTable`)."""

    def publish_guest6(self, addr: bytes) -> None:
        """Record the address for every worker."""

    def guest6(self) -> bytes | None:
        """The address some worker last recorded, or None."""


class Forwarding:
    """The guest <-> host address mapping of one worker."""

    def __init__(self, port: WorkerPort, setup: ForwardSetup = ForwardSetup(),
                 shared: SharedGuest6 | None = None) -> None:
        """The mapping ``setup`` describes, for the guest behind ``port``; ``shared``: where the workers
        share the guest's IPv6 address (the flow table)."""
        self.port = port
        self.shared = shared
        ordered = _parse_all(setup.map_host_loopback)
        #: Addresses that stand for the host's loopback.
        self.mapped = frozenset(ordered)
        #: What a loopback client of each family appears as (None: nothing is mapped in that family).
        self.shown4 = next((a for a in ordered if inany.is_v4(a)), None)
        self.shown6 = next((a for a in ordered if not inany.is_v4(a)), None)
        #: Guest-side DNS forwarding address -> the host resolver its queries go to (chosen by
        #: shardswitch.guest_addressing).
        self.dns: dict[InAny, InAny] = {}
        for guest_side, resolver in setup.dns_forward:
            parsed = _parse_all((guest_side, resolver))
            if len(parsed) == 2:
                self.dns[parsed[0]] = parsed[1]
        #: --map-guest-addr, and the host's own addresses it stands for (the guest's, mirrored).
        self.map_guest: InAny | None = inany.from_str(setup.map_guest_addr) if setup.map_guest_addr else None
        params = port.params
        self.host_own: dict[bool, InAny | None] = {
            True: inany.from_v4(params.address), False: params.address6}
        #: (source address, interface) host sockets of guest flows are bound to, per family (v4: True).
        self.outbound: dict[bool, tuple[InAny | None, str]] = {True: (None, setup.outbound_if4),
                                                               False: (None, setup.outbound_if6)}
        for addr in _parse_all(setup.outbound):
            v4 = inany.is_v4(addr)
            self.outbound[v4] = (addr, self.outbound[v4][1])
        #: The guest's global IPv6 address as last seen (None: not seen yet).
        self.guest6: InAny | None = params.address6
        #: IPv4 broadcast addresses: the limited one, and the guest subnet's directed one.
        host_bits = ~params.netmask & 0xFFFFFFFF
        self._broadcast4 = frozenset({0xFFFFFFFF, params.address | host_bits} if params.prefix_len <= 30
                                     else {0xFFFFFFFF})

    def to_host(self, dst: InAny, port: int) -> tuple[InAny, int]:
        """Where guest traffic to ``dst``:``port`` goes on the host (``port`` 0 for echo)."""
        if port == DNS_PORT:
            resolver = self.dns.get(dst)
            if resolver is not None:
                return resolver, DNS_PORT
        if dst in self.mapped:
            return inany.loopback_like(dst), port
        if dst == self.map_guest:
            own = self.host_own[inany.is_v4(dst)]
            if own is not None:
                return own, port
        return dst, port

    def is_unicast(self, dst: InAny) -> bool:
        """Whether the guest may start a flow to ``dst``: not unspecified, multicast, broadcast (limited,
        or directed to the guest's own subnet) or loopback (the host's loopback is reached through a
        mapped address, never by its own address)."""
        if inany.is_v4(dst):
            return self.is_unicast4(int.from_bytes(dst[12:], "big"))
        return not (ipv6.is_multicast(dst) or ipv6.is_unspecified(dst) or dst == ipv6.LOOPBACK)

    def is_unicast4(self, addr: int) -> bool:
        """:meth:`is_unicast` for an IPv4 address as an int (the per-datagram check of guest UDP)."""
        return not (addr >> 28 == 0xE or addr >> 24 in (0, 127) or addr in self._broadcast4)

    def bind_outbound(self, sock: socket.socket, target: InAny, port: int = 0) -> None:
        """Bind ``sock``, about to reach ``target``, to the outbound address and interface of its family,
        and to local ``port`` when not 0 (a flow re-created by a migration keeps its port).

        Raises OSError when the kernel refuses (no such address or interface,
        no CAP_NET_RAW for an interface, the port taken).
        """
        v4 = inany.is_v4(target)
        any_addr = inany.ANY4 if v4 else inany.ANY6
        if inany.is_loopback(target):
            if port:
                sock.bind(inany.sockaddr(any_addr, port))
            return
        addr, ifname = self.outbound[v4]
        if ifname:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        if addr is not None or port:
            sock.bind(inany.sockaddr(addr if addr is not None else any_addr, port))

    def seen_from(self, client: InAny) -> InAny | None:
        """The address a host client appears to come from in the guest (None: it cannot appear)."""
        if inany.is_loopback(client):
            return self.shown4 if inany.is_v4(client) else self.shown6
        v4 = inany.is_v4(client)
        if client == self.host_own[v4]:
            if self.map_guest is not None and inany.is_v4(self.map_guest) == v4:
                return self.map_guest
            return self.shown4 if v4 else self.shown6
        return client

    def learn_guest(self, src: InAny) -> None:
        """A flow the guest started from ``src``: remember its global IPv6 address (unicast sources only),
        and tell the other workers (through the shared table) when it changed."""
        if (src == self.guest6 or inany.is_v4(src) or ipv6.is_unspecified(src) or ipv6.is_multicast(src)
                or (ipv6.is_link_local(src) and self.guest6 is not None)):
            return
        self.guest6 = src
        if self.shared is not None and not ipv6.is_link_local(src):
            self.shared.publish_guest6(src)

    def guest_address(self, v4: bool) -> InAny | None:
        """The guest's address of one family, as the target of a forwarded flow (None: not known)."""
        params = self.port.params
        if v4:
            return inany.from_v4(params.address)
        seen = self.shared.guest6() if self.shared is not None else None
        if seen is not None:
            return seen
        if self.guest6 is not None:
            return self.guest6
        mac = self.port.guest_mac
        return ipv6.link_local_from_mac(mac) if mac is not None else None
