"""Why a frame was dropped: the drop vocabulary, and the one error type of the packet layer.

Theory of operation: every parser and handler in :mod:`shardswitch.net`
checks lengths and fields before it touches guest bytes and, when a frame
cannot or should not be processed, raises :class:`PacketError` carrying a
:class:`DropReason`.  Nothing else is raised for bad input.  The dispatcher
(:class:`shardswitch.net.endpoint.GuestEndpoint`) catches the exception at
the single entry point, counts the reason and reports it to its caller, so a
malformed frame costs one counter increment and never a crash.

:class:`DropReason` is the one vocabulary of drops: the packet layer's
reasons (a guest frame it refused) and, after them, the worker's own (a
frame either way that could not be passed on: no RX buffers, no host socket,
a full flow table).  What happens without losing a frame is an event, not a
drop (:class:`shardswitch.worker.counters.Event`).  The reason names are
stable: they are shown to users (``shardswitch status``), so rename none of
them; add new ones at the end.
"""

from __future__ import annotations

from enum import IntEnum


class DropReason(IntEnum):
    """Why a frame from the guest was not consumed (stable, user-visible names)."""

    #: Frame shorter than an Ethernet header.
    TRUNCATED = 1
    #: Source MAC is multicast, all zeros, or our own MAC.
    ETH_BAD_SOURCE = 2
    #: Unicast to a MAC address other than ours.
    NOT_FOR_US = 3
    #: EtherType without a handler (VLAN tags, LLDP, ...).
    ETHERTYPE_UNHANDLED = 4
    #: IPv6 next header without a handler (after extension headers).
    IPV6_UNHANDLED = 5
    #: ARP packet too short or not Ethernet/IPv4 ARP.
    ARP_MALFORMED = 6
    #: Well-formed ARP we do not answer (replies, RARP and other operations).
    ARP_IGNORED = 7
    #: IPv4 header inconsistent (version, IHL, total length).
    IPV4_MALFORMED = 8
    #: IPv4 header checksum wrong.
    IPV4_BAD_CHECKSUM = 9
    #: IPv4 fragment (fragments are not reassembled).
    IPV4_FRAGMENT = 10
    #: IPv4 payload protocol without a handler (anything but ICMP, TCP and UDP).
    IP_PROTO_UNHANDLED = 11
    #: UDP header inconsistent with the IPv4 payload.
    UDP_MALFORMED = 12
    #: UDP checksum wrong.
    UDP_BAD_CHECKSUM = 13
    #: UDP destination port without a handler.
    UDP_PORT_UNHANDLED = 14
    #: DHCP/BOOTP message too short, bad options or fields.
    DHCP_MALFORMED = 15
    #: Well-formed DHCP/BOOTP message we do not answer.
    DHCP_IGNORED = 16
    #: IPv6 header inconsistent (version, payload length, multicast source) or
    #: extension headers out of bounds, misplaced or too many.
    IPV6_MALFORMED = 17
    #: IPv6 fragment header (fragments are not reassembled).
    IPV6_FRAGMENT = 18
    #: IPv6 routing header with segments left (source routing is not done).
    IPV6_ROUTING = 19
    #: ICMP message shorter than its header, or an echo request with a non-zero code.
    ICMP_MALFORMED = 20
    #: ICMP checksum wrong.
    ICMP_BAD_CHECKSUM = 21
    #: Well-formed ICMP message we do not handle (anything but an echo request).
    ICMP_IGNORED = 22
    #: ICMPv6 message shorter than its header, or an echo request with a non-zero code.
    ICMPV6_MALFORMED = 23
    #: ICMPv6 checksum wrong.
    ICMPV6_BAD_CHECKSUM = 24
    #: Well-formed ICMPv6 message we do not handle (MLD reports, errors, ...).
    ICMPV6_IGNORED = 25
    #: NDP message failing RFC 4861 validation (hop limit, code, length, options).
    NDP_MALFORMED = 26
    #: Well-formed NDP message we do not answer (advertisements, redirects).
    NDP_IGNORED = 27
    #: TCP header inconsistent (length, data offset, port 0).
    TCP_MALFORMED = 28
    #: TCP checksum wrong.
    TCP_BAD_CHECKSUM = 29
    #: Well-formed TCP segment we do not handle (no flow and not a SYN, or refused).
    TCP_IGNORED = 30
    # -- the worker's own reasons: frames either way that the packet layer handled but could not pass on --
    #: A frame for the guest waited too long for RX buffers (queue full) and was dropped.
    RX_NO_BUFFERS = 31
    #: Frames queued for the guest when its RX ring stopped.
    RX_RING_DOWN = 32
    #: A frame for the guest larger than any RX chain the guest posts.
    RX_TOO_BIG = 33
    #: A TX chain with no frame after the virtio-net header.
    TX_EMPTY_FRAME = 34
    #: A frame of another worker's flow whose hand-over inbox was full.
    HAND_OVER_FAILED = 35
    #: Handling the frame failed inside shardswitch itself (a bug; the traceback is logged).
    INTERNAL_ERROR = 36
    #: No host ping socket could be opened for a new echo flow.
    PING_SOCKET_ERROR = 37
    #: The host refused an echo request on its ping socket.
    PING_SEND_ERROR = 38
    #: The flow table is full: no new echo flow.
    PING_TABLE_FULL = 39
    #: No host socket could be opened or connected for a new UDP flow.
    UDP_SOCKET_ERROR = 40
    #: The host socket refused a guest datagram.
    UDP_SEND_ERROR = 41
    #: The flow table is full: no new UDP flow.
    UDP_TABLE_FULL = 42
    #: A host datagram too large for the guest's MTU.
    UDP_TOO_BIG = 43
    #: A forwarded (-u) datagram for a guest whose address is not known.
    UDP_NO_GUEST_ADDRESS = 44
    #: A forwarded (-u) datagram whose flow another worker entered at the same moment.
    UDP_FLOW_CONFLICT = 45
    #: No host socket could be used for a new TCP connection.
    TCP_SOCKET_ERROR = 46
    #: The flow table is full: no new TCP connection (the guest gets a RST).
    TCP_TABLE_FULL = 47
    #: A forwarded (-t) connection for a guest whose address or MAC is not known.
    TCP_NO_GUEST_ADDRESS = 48
    # -- packet-layer reasons added later (numbers only ever grow) --
    #: DHCPv6 message too short or too long, an option out of bounds, a duplicate or
    #: malformed option, or a message breaking the RFC 8415 section 16 rules.
    DHCPV6_MALFORMED = 49
    #: Well-formed DHCPv6 message we do not answer (server messages, relays, another
    #: server's identifier, not to us, no address to give).
    DHCPV6_IGNORED = 50
    #: IPv6 packet whose source or destination is IPv4-mapped (::ffff:0:0/96): never on the wire
    #: (RFC 4291 section 2.5.5.2; Linux drops them too), and ambiguous with IPv4 in a flow's addresses.
    IPV6_V4_MAPPED = 51
    # -- the flow policy's refusals (shardswitch.worker.policy): a new flow the guest may not start --
    #: A new flow from an unspecified, multicast or loopback source address.
    FLOW_BAD_SOURCE = 52
    #: A new flow to an unspecified address (0.0.0.0/8, ::) or to port 0.
    FLOW_DST_UNSPECIFIED = 53
    #: A new flow to the host's loopback by its own address (127.0.0.0/8, ::1): only mapped addresses lead
    #: there.
    FLOW_DST_LOOPBACK = 54
    #: A new flow to a multicast or broadcast address (limited, or the guest subnet's directed one; the
    #: reserved 240.0.0.0/4 too).
    FLOW_DST_MULTICAST = 55
    #: A new flow to a link-local address (169.254.0.0/16, fe80::/10: the cloud's metadata service among
    #: them) or to a known metadata address, refused by default (--allow-link-local lifts it).
    FLOW_DST_LINK_LOCAL = 56
    #: A new flow to an address of the operator's deny list (--deny).
    FLOW_DST_DENIED = 57
    #: A datagram from a new client on a forwarded (-u) port whose rule was removed at run time (its socket
    #: stays open, for the flows it still carries, until their last one ends).
    UDP_FORWARD_REMOVED = 58


class PacketError(Exception):
    """A guest frame is dropped for ``reason``; ``detail`` helps debugging only."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        """Record the drop reason and an optional human-readable detail."""
        super().__init__(f"{reason.name}: {detail}" if detail else reason.name)
        #: Why the frame was dropped.
        self.reason = reason
        #: Free text for logs and tests; never parsed.
        self.detail = detail
