"""Address translation between the guest's view and the host's: passt's fwd.c.

Theory of operation.  The guest sees one network; the host sockets that carry
its flows see another.  Every protocol asks this module, in both directions,
instead of building the mapping itself:

* guest -> host (:meth:`Forwarding.target`): where a flow the guest starts
  really goes, and whether it may go at all: the one place that decides it,
  for TCP, UDP and echo flows, new or restored by a migration (passt's
  flow_target / fwd_nat_from_tap).  The flow policy
  (:mod:`~shardswitch.worker.policy`) screens the guest's addresses first
  (no loopback, unspecified, multicast or broadcast destination, no port 0),
  then the mapping (:meth:`Forwarding.to_host`) applies: a DNS forwarding address (``--dns-forward``, or the gateway
  on hosts whose resolvers are on their loopback) on port 53 (or 853, DNS over TLS) means the host
  resolver paired with it (chosen by :mod:`shardswitch.guest_addressing`).  A destination that is a *mapped* address
  (``--map-host-loopback``, the gateways by default) means the host itself:
  the host's loopback of that family.  ``--map-guest-addr`` means the host's
  own address that the guest's address (mirrored from the host) shadows.
  Anything else goes where the guest sent it, if the policy's deny lists
  (``--deny``, link-local and metadata addresses by default) allow it.
* the host socket of a flow the guest starts (:meth:`Forwarding.bind_outbound`):
  bound to ``-o``'s source address and ``--outbound-if4/6``'s interface of
  its family, unless it goes to the host's loopback (which no interface
  binding could reach), and connected (:meth:`Forwarding.connect`).
* host -> guest (:meth:`Forwarding.inbound`, :meth:`Forwarding.seen_from`): the address a host client of
  a forwarded port (``-t``/``-u``) appears to come from, and the guest's address it goes to: the rule's
  target address when it names one (``0.0.0.0/5000:192.0.2.5/6000``), which the flow policy screens
  (:meth:`~shardswitch.worker.policy.FlowPolicy.forward_target`), else the guest's own.  A client on the
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

import errno
import socket
from typing import Protocol

from shardswitch.ipc import ForwardSetup
from shardswitch.net import inany, ipv6
from shardswitch.net.inany import InAny
from shardswitch.net.params import ResolvedParams
from shardswitch.shm.layout import FlowSide, FlowType
from shardswitch.worker.policy import FlowPolicy
from shardswitch.worker.port import WorkerPort

#: The DNS port, and DNS over TLS's: both are forwarded to the resolver, as passt's.
DNS_PORT = 53
DNS_PORTS = frozenset({DNS_PORT, 853})
#: Flow types whose destination has a port (0 is refused).
_PORTED = frozenset({FlowType.TCP, FlowType.UDP})


def _parse_all(texts: tuple[str, ...]) -> list[InAny]:
    """The valid addresses among ``texts``, in order (bad ones are skipped)."""
    parsed = []
    for text in texts:
        try:
            parsed.append(inany.from_str(text))
        except inany.AddressError:
            continue
    return parsed


def flow_policy(setup: ForwardSetup, params: ResolvedParams) -> FlowPolicy:
    """The flow policy of a guest with ``params`` under ``setup`` (a worker's, and the coordinator's to check
    a forwarding rule's target when it is added): the IPv4 broadcast addresses (the limited one, the guest
    subnet's directed one) and the switch's own addresses on the guest side."""
    host_bits = ~params.netmask & 0xFFFFFFFF
    own = {inany.from_v4(params.gateway), params.our_ll6, params.gateway6, params.router_ll6,
           *_parse_all(setup.map_host_loopback), *_parse_all(tuple(guest for guest, _ in setup.dns_forward)),
           *_parse_all((setup.map_guest_addr,) if setup.map_guest_addr else ())}
    return FlowPolicy(setup.deny, setup.allow_link_local,
                      frozenset({0xFFFFFFFF, params.address | host_bits} if params.prefix_len <= 30
                                else {0xFFFFFFFF}), frozenset(own))


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
        #: What the guest may address (IPv4 broadcast: the limited one, and the guest subnet's directed one).
        self.policy = flow_policy(setup, params)

    def target(self, ftype: FlowType, guest_side: FlowSide) -> tuple[InAny, int]:
        """Where a flow the guest starts with ``guest_side`` goes on the host: the one place that decides it.

        The flow policy screens the guest's addresses, the mapping translates
        the destination, and a destination no mapping claimed must pass the
        policy's deny lists (:mod:`~shardswitch.worker.policy`).  Raises
        PacketError with the refusing rule's reason.  Every guest-started flow
        asks here - TCP, UDP and echo, new or restored by a migration - and
        opens its socket with :meth:`connect`.
        """
        dst, port = guest_side.our_addr, guest_side.our_port
        self.policy.screen(guest_side.ep_addr, dst, port if ftype in _PORTED else None)
        target = self.to_host(dst, port)
        if target == (dst, port):
            self.policy.egress(dst)
        return target

    def to_host(self, dst: InAny, port: int) -> tuple[InAny, int]:
        """The mapping alone: where guest traffic to ``dst``:``port`` goes (``port`` 0 for echo)."""
        if port in DNS_PORTS:
            resolver = self.dns.get(dst)
            if resolver is not None:
                return resolver, port
        if dst in self.mapped:
            return inany.loopback_like(dst), port
        if dst == self.map_guest:
            own = self.host_own[inany.is_v4(dst)]
            if own is not None:
                return own, port
        return dst, port

    def connect(self, sock: socket.socket, target: InAny, port: int, local_port: int = 0) -> int:
        """Bind ``sock`` as :meth:`bind_outbound` does and connect it to ``target``:``port`` (a
        :meth:`target`); the errno (0, or EINPROGRESS for a non-blocking TCP socket, when it worked)."""
        try:
            self.bind_outbound(sock, target, local_port)
        except OSError as exc:
            return exc.errno or errno.EADDRNOTAVAIL
        return sock.connect_ex(inany.sockaddr(target, port))

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

    def inbound(self, client: InAny, target: InAny | None = None) -> tuple[InAny, InAny] | None:
        """The guest side of a flow a host ``client`` starts on a forwarded port: (the address it appears
        from, the guest's address it goes to: the rule's ``target``, else the guest's own of the client's
        family); None when either is unknown (the caller refuses it).  Raises PacketError when the flow
        policy refuses ``target``: every forwarded flow, new or restored, asks here."""
        remote = self.seen_from(client)
        if target is not None:
            self.policy.forward_target(target, client)
            guest: InAny | None = target
        else:
            guest = self.guest_address(inany.is_v4(client))
        if remote is None or guest is None:
            return None
        return remote, guest

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
