"""The guest-facing dispatcher of one worker: guest frames in, reply frames out.

Theory of operation: :meth:`GuestEndpoint.handle_frame` is the one entry
point for every frame the guest transmits.  It validates the Ethernet
header (length, a unicast non-zero source that is not our MAC, a
destination that is our MAC or a group address), learns the guest's MAC
from the source, then dispatches through three small tables:

* EtherType -> :class:`EtherHandler` (ARP; IPv4 is parsed and dispatched by
  the endpoint itself);
* IP protocol -> :class:`Ipv4Handler` (UDP is parsed and dispatched by the
  endpoint itself), and IPv6 next header -> :class:`Ipv6Handler` (ICMPv6
  and UDP are parsed and dispatched by the endpoint itself; ICMPv6 by type
  -> :class:`Icmpv6Handler`, NDP to :class:`~shardswitch.net.ndp.NdpResponder`);
* UDP destination port -> :class:`UdpHandler` over IPv4 (DHCP on port 67)
  and :class:`Udp6Handler` over IPv6 (DHCPv6 on port 547), each table with
  an optional default handler for everything else (the worker's UDP flows).

Later protocols (ICMP, TCP, UDP flows) plug in with
:meth:`~GuestEndpoint.register_ethertype`,
:meth:`~GuestEndpoint.register_ip_protocol`,
:meth:`~GuestEndpoint.register_ip6_protocol`,
:meth:`~GuestEndpoint.register_icmpv6_type`,
:meth:`~GuestEndpoint.register_udp_port` / :meth:`~GuestEndpoint.register_udp6_port`
and :meth:`~GuestEndpoint.set_udp_default` / :meth:`~GuestEndpoint.set_udp6_default`
without touching this module.  A datagram is parsed (and its checksum
verified) once, here; handlers get the :class:`~shardswitch.net.udp.UdpDatagram`.

Handlers append complete Ethernet frames to ``out`` and return None, or
raise :class:`PacketError`; they must append only once they can no longer
fail.  The endpoint catches the error at its single entry point, counts the
reason in :attr:`GuestEndpoint.drops` and returns it.

Checksum offload: the caller says whether the frame's L4 checksum was left
to the device (the guest's virtio-net header had NEEDS_CSUM).  The flag
travels with the parsed packet (``csum_partial`` of
:class:`~shardswitch.net.ipv4.Ipv4Packet` / :class:`~shardswitch.net.ipv6.Ipv6Packet`),
so that the UDP parser here and the TCP and UDP handlers of the worker skip
verifying that checksum.  Nothing here does I/O or reads the clock: ``now``
is passed down for handlers that keep timers.  Exceptions other than
:class:`PacketError` (a worker's hand-over of a frame to another worker, a
bug) pass through to the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import IntFlag
from typing import Protocol

from . import eth, icmpv6, ipv4, ipv6, udp
from .arp import ArpResponder
from .dhcp import SERVER_PORT, DhcpServer
from .dhcpv6 import SERVER_PORT as DHCPV6_SERVER_PORT
from .dhcpv6 import Dhcpv6Server
from .drop import DropReason, PacketError
from .eth import EtherType
from .icmpv6 import NDP_TYPES, Icmpv6Message
from .ipv4 import IpProto, Ipv4Packet
from .ipv6 import Ipv6Packet, NextHeader
from .ndp import NdpResponder
from .params import GuestParams, resolve
from .udp import UdpDatagram

__all__ = ["DropReason", "EtherHandler", "GuestEndpoint", "Icmpv6Handler", "Ipv4Handler", "Ipv6Handler",
           "PacketError", "Udp6Handler", "UdpHandler"]


class EtherHandler(Protocol):
    """Handles the payload of frames of one EtherType."""

    def __call__(self, eth_src: bytes, payload: memoryview, now: float,
                 out: list[bytes]) -> None:
        """Consume ``payload`` (after the Ethernet header), appending replies to ``out``."""


class Ipv4Handler(Protocol):
    """Handles validated IPv4 packets of one IP protocol."""

    def __call__(self, eth_src: bytes, packet: Ipv4Packet, now: float,
                 out: list[bytes]) -> None:
        """Consume ``packet``, appending replies to ``out``."""


class Ipv6Handler(Protocol):
    """Handles validated IPv6 packets of one next header (after extension headers)."""

    def __call__(self, eth_src: bytes, packet: Ipv6Packet, now: float,
                 out: list[bytes]) -> None:
        """Consume ``packet``, appending replies to ``out``."""


class Icmpv6Handler(Protocol):
    """Handles validated ICMPv6 messages of one type."""

    def __call__(self, eth_src: bytes, packet: Ipv6Packet, message: Icmpv6Message, now: float,
                 out: list[bytes]) -> None:
        """Consume ``message``, appending replies to ``out``."""


class UdpHandler(Protocol):
    """Handles validated UDP datagrams over IPv4 for one destination port."""

    def __call__(self, eth_src: bytes, packet: Ipv4Packet, datagram: UdpDatagram, now: float,
                 out: list[bytes]) -> None:
        """Consume ``datagram``, appending replies to ``out``."""


class Udp6Handler(Protocol):
    """Handles validated UDP datagrams over IPv6 for one destination port."""

    def __call__(self, eth_src: bytes, packet: Ipv6Packet, datagram: UdpDatagram, now: float,
                 out: list[bytes]) -> None:
        """Consume ``datagram``, appending replies to ``out``."""


class Service(IntFlag):
    """The guest services an endpoint offers (``--no-dhcp``, ``--no-ndp``, ``--no-ra``... turn them off)."""

    NONE = 0
    #: DHCPv4 on UDP port 67 (off: DHCP requests are dropped as UDP_PORT_UNHANDLED).
    DHCP = 1
    #: NDP: neighbour advertisements for the guest's solicitations (off: NDP is dropped as ICMPV6_IGNORED).
    NDP = 2
    #: Router advertisements answering the guest's solicitations (part of NDP).
    RA = 4
    #: DHCPv6 on UDP port 547 (off: its requests go to the default IPv6 UDP handler, and RAs
    #: do not set the Managed and Other flags).
    DHCPV6 = 8
    #: IPv4 and ARP at all (off: ``-6``; such frames are dropped as ETHERTYPE_UNHANDLED).
    IPV4 = 16
    #: IPv6 at all (off: ``-4``; such frames are dropped as ETHERTYPE_UNHANDLED).
    IPV6 = 32
    #: The worker's TCP and UDP flows (off: ``--no-tcp`` / ``--no-udp``; such packets are dropped as
    #: IP_PROTO_UNHANDLED / UDP_PORT_UNHANDLED; DHCP and DHCPv6 still answer).  The worker plugs them in.
    TCP = 64
    UDP = 128
    ALL = DHCP | NDP | RA | DHCPV6 | IPV4 | IPV6 | TCP | UDP


class GuestEndpoint:
    """The guest-facing protocol logic of one worker: takes guest frames, returns reply frames."""

    def __init__(self, params: GuestParams, services: Service = Service.ALL) -> None:
        """Resolve ``params`` (ParamsError if invalid) and install ARP and the ``services`` (DHCP, NDP, RA, DHCPv6)."""
        #: The validated, wire-ready parameters.
        self.resolved = resolve(params)
        #: The guest's MAC, learned from the source of its frames.
        self.guest_mac: bytes | None = None
        #: Frames dropped so far, per reason.
        self.drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.arp = ArpResponder(self.resolved)
        self.dhcp = DhcpServer(self.resolved)
        self.dhcpv6 = Dhcpv6Server(self.resolved)
        self.ndp = NdpResponder(self.resolved, ra=bool(services & Service.RA),
                                dhcpv6=bool(services & Service.DHCPV6))
        #: The frame being handled has a partial L4 checksum (NEEDS_CSUM); copied into its IP packet.
        self._csum_partial = False
        self._our_mac = self.resolved.our_mac
        self._ether_handlers: dict[int, EtherHandler] = {}
        self._ip_handlers: dict[int, Ipv4Handler] = {}
        self._udp_handlers: dict[int, UdpHandler] = {}
        self._udp_default: UdpHandler | None = None
        self._udp6_handlers: dict[int, Udp6Handler] = {}
        self._udp6_default: Udp6Handler | None = None
        self._ip6_handlers: dict[int, Ipv6Handler] = {}
        self._icmpv6_handlers: dict[int, Icmpv6Handler] = (
            dict.fromkeys(NDP_TYPES, self.ndp.handle_icmpv6) if services & Service.NDP else {})
        if services & Service.IPV4:
            self.register_ethertype(EtherType.ARP, self.arp.handle)
            self.register_ethertype(EtherType.IPV4, self._handle_ipv4)
        if services & Service.IPV6:
            self.register_ethertype(EtherType.IPV6, self._handle_ipv6)
        self.register_ip_protocol(IpProto.UDP, self._handle_udp)
        self.register_ip6_protocol(NextHeader.ICMPV6, self._handle_icmpv6)
        self.register_ip6_protocol(NextHeader.UDP, self._handle_udp6)
        if services & Service.DHCP:
            self.register_udp_port(SERVER_PORT, self.dhcp.handle_udp)
        if services & Service.DHCPV6:
            self.register_udp6_port(DHCPV6_SERVER_PORT, self.dhcpv6.handle_udp)

    def register_ethertype(self, ethertype: int, handler: EtherHandler) -> None:
        """Route frames of ``ethertype`` to ``handler`` (replacing any previous one)."""
        self._ether_handlers[ethertype] = handler

    def register_ip_protocol(self, proto: int, handler: Ipv4Handler) -> None:
        """Route IPv4 packets of protocol ``proto`` to ``handler``."""
        self._ip_handlers[proto] = handler

    def register_ip6_protocol(self, next_header: int, handler: Ipv6Handler) -> None:
        """Route IPv6 packets whose (final) next header is ``next_header`` to ``handler``."""
        self._ip6_handlers[next_header] = handler

    def register_icmpv6_type(self, icmp_type: int, handler: Icmpv6Handler) -> None:
        """Route ICMPv6 messages of ``icmp_type`` to ``handler`` (NDP types go to NDP)."""
        self._icmpv6_handlers[icmp_type] = handler

    def register_udp_port(self, port: int, handler: UdpHandler) -> None:
        """Route UDP datagrams to destination ``port`` to ``handler``."""
        self._udp_handlers[port] = handler

    def set_udp_default(self, handler: UdpHandler | None) -> None:
        """Route UDP datagrams to ports without their own handler to ``handler``."""
        self._udp_default = handler

    def register_udp6_port(self, port: int, handler: Udp6Handler) -> None:
        """Route UDP datagrams over IPv6 to destination ``port`` to ``handler``."""
        self._udp6_handlers[port] = handler

    def set_udp6_default(self, handler: Udp6Handler | None) -> None:
        """Route UDP datagrams over IPv6 to ports without their own handler to ``handler``."""
        self._udp6_default = handler

    def handle_frame(self, frame: memoryview, now: float, out: list[bytes],
                     csum_partial: bool = False) -> DropReason | None:
        """Process one frame from the guest; no input makes it raise (a handler may, beyond PacketError).

        ``csum_partial``: its TCP/UDP checksum holds only the pseudo-header
        sum (NEEDS_CSUM) and is not verified.  Returns None when the frame was
        consumed (replies, if any, appended to ``out`` as complete Ethernet
        frames), else the counted drop reason.
        """
        self._csum_partial = csum_partial
        try:
            self._dispatch(frame, now, out)
        except PacketError as exc:
            self.drops[exc.reason] += 1
            return exc.reason
        return None

    def _dispatch(self, frame: memoryview, now: float, out: list[bytes]) -> None:
        """Check the Ethernet header, learn the guest MAC, dispatch by EtherType."""
        dst, src, ethertype = eth.parse_header(frame)
        if not eth.is_valid_source(src) or src == self._our_mac:
            raise PacketError(DropReason.ETH_BAD_SOURCE, eth.mac_to_str(src))
        self.guest_mac = src
        if dst != self._our_mac and not dst[0] & 1:
            raise PacketError(DropReason.NOT_FOR_US, eth.mac_to_str(dst))
        handler = self._ether_handlers.get(ethertype)
        if handler is None:
            raise PacketError(DropReason.ETHERTYPE_UNHANDLED, f"{ethertype:#06x}")
        handler(src, frame[eth.ETH_HLEN:], now, out)

    def _handle_ipv4(self, eth_src: bytes, payload: memoryview, now: float,
                     out: list[bytes]) -> None:
        """Validate an IPv4 packet and dispatch it by protocol."""
        packet = ipv4.parse(payload)
        packet.csum_partial = self._csum_partial
        self._dispatch_ip(self._ip_handlers, packet.proto, DropReason.IP_PROTO_UNHANDLED, eth_src, packet, now,
                          out)

    def _handle_ipv6(self, eth_src: bytes, payload: memoryview, now: float,
                     out: list[bytes]) -> None:
        """Validate an IPv6 packet and dispatch it by its final next header."""
        packet = ipv6.parse(payload)
        packet.csum_partial = self._csum_partial
        self._dispatch_ip(self._ip6_handlers, packet.next_header, DropReason.IPV6_UNHANDLED, eth_src, packet, now,
                          out)

    @staticmethod
    def _dispatch_ip(handlers: Mapping[int, Callable[..., None]], proto: int, unhandled: DropReason,
                     eth_src: bytes, packet: Ipv4Packet | Ipv6Packet, now: float, out: list[bytes]) -> None:
        """Hand a validated IP packet to the handler of its (final) protocol number, or refuse it."""
        handler = handlers.get(proto)
        if handler is None:
            raise PacketError(unhandled, f"protocol {proto}")
        handler(eth_src, packet, now, out)

    def _handle_icmpv6(self, eth_src: bytes, packet: Ipv6Packet, now: float,
                       out: list[bytes]) -> None:
        """Validate an ICMPv6 message and dispatch it by type (NDP, echo)."""
        message = icmpv6.parse(packet)
        handler = self._icmpv6_handlers.get(message.type)
        if handler is None:
            raise PacketError(DropReason.ICMPV6_IGNORED, f"type {message.type}")
        handler(eth_src, packet, message, now, out)

    def _handle_udp(self, eth_src: bytes, packet: Ipv4Packet, now: float,
                    out: list[bytes]) -> None:
        """Validate a UDP datagram and dispatch it by destination port."""
        datagram = udp.parse(packet, not packet.csum_partial)
        self._dispatch_udp(self._udp_handlers, self._udp_default, eth_src, packet, datagram, now, out)

    def _handle_udp6(self, eth_src: bytes, packet: Ipv6Packet, now: float,
                     out: list[bytes]) -> None:
        """Validate a UDP datagram over IPv6 and dispatch it by destination port."""
        datagram = udp.parse6(packet, not packet.csum_partial)
        self._dispatch_udp(self._udp6_handlers, self._udp6_default, eth_src, packet, datagram, now, out)

    @staticmethod
    def _dispatch_udp(handlers: Mapping[int, Callable[..., None]], default: Callable[..., None] | None,
                      eth_src: bytes, packet: Ipv4Packet | Ipv6Packet, datagram: UdpDatagram, now: float,
                      out: list[bytes]) -> None:
        """Hand a validated datagram to the handler of its destination port, else the default, or refuse it."""
        handler = handlers.get(datagram.dst_port, default)
        if handler is None:
            raise PacketError(DropReason.UDP_PORT_UNHANDLED, f"port {datagram.dst_port}")
        handler(eth_src, packet, datagram, now, out)
