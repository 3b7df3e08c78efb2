"""The flow policy: which addresses a guest's new flow may come from and go to.

Theory of operation.  passt refuses what a guest may not reach in several
places (loopback frames in tap.c, non-unicast endpoints in tcp.c's SYN
handler, broadcast in udp.c); here every such rule lives in this one pure
object, and :class:`~shardswitch.worker.fwd.Forwarding` asks it on the one
path that decides where a flow goes (:meth:`Forwarding.target`), which every
guest-started flow takes: TCP, UDP and echo, new or restored by a migration.
A refusal is a :class:`~shardswitch.net.drop.PacketError` whose reason says
which rule refused it; the protocol answers the guest (a RST for TCP) and the
frame is counted under that reason.

Two stages, because the mapping between them matters:

* :meth:`FlowPolicy.screen`, on the guest's own addresses, before anything
  else (and before the flow table's lock is taken: no flow can have such an
  address, so a refused frame costs no lock).  The source must be a unicast
  address of the guest (not unspecified, multicast or loopback); the
  destination must not be unspecified (0.0.0.0/8, ::), loopback (127.0.0.0/8,
  ::1: the host's loopback is reached through a *mapped* address, never by its
  own), multicast or broadcast (the limited one, and the guest subnet's
  directed one; the reserved 240.0.0.0/4 with them); TCP and UDP need a port other than 0.  IPv4-mapped IPv6
  addresses never get here: the IPv6 parser refuses them
  (:data:`~shardswitch.net.drop.DropReason.IPV6_V4_MAPPED`), so an address's
  family is the family of its frame.
* :meth:`FlowPolicy.forward_target`, on the target of a flow a host client
  starts on a forwarded port whose rule names an address inside the guest
  (``-t 0.0.0.0/5000:192.0.2.5/6000``), new or restored by a migration: a
  unicast address by the same classes as a destination above (no
  unspecified, loopback, multicast or broadcast address), of the client's
  family, and none of the switch's own addresses on the guest side (the
  gateway, mapped and DNS forwarding addresses, our link-local address):
  frames to those would never reach a socket of the guest.  The coordinator
  asks the same question of a rule when it is added, so that the operator
  hears of a refused target at once.
* :meth:`FlowPolicy.egress`, on a destination the operator did not map: the
  operator's deny list (``--deny ADDR[/LEN]``), and by default link-local
  addresses (169.254.0.0/16, fe80::/10) and the cloud metadata services that
  live outside them (:data:`METADATA`).  A destination the operator mapped
  (``--map-host-loopback``, ``--map-guest-addr``, DNS forwarding) goes where
  the operator said, and the deny list does not apply to it.

Addresses are 16-byte :mod:`~shardswitch.net.inany` values; prefixes are kept
as (value, mask) pairs over the whole 128 bits, so one comparison serves both
families.
"""

from __future__ import annotations

import ipaddress

from shardswitch.net import inany
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.inany import InAny

#: Link-local prefixes, refused by default (a host's link is not the guest's).
LINK_LOCAL = ("169.254.0.0/16", "fe80::/10")
#: Cloud metadata services outside the link-local prefixes (AWS over IPv6, Alibaba Cloud); refused by
#: default with them: a guest asking them would do so with the host's identity.
METADATA = ("fd00:ec2::254/128", "100.100.100.200/32")

#: The drop reasons of the policy's refusals.
REFUSALS = frozenset({DropReason.FLOW_BAD_SOURCE, DropReason.FLOW_DST_UNSPECIFIED, DropReason.FLOW_DST_LOOPBACK,
                      DropReason.FLOW_DST_MULTICAST, DropReason.FLOW_DST_LINK_LOCAL, DropReason.FLOW_DST_DENIED})

#: A prefix as (network bits, mask) over the 128 bits of an inany address.
Prefix = tuple[int, int]


class PolicyError(ValueError):
    """A deny-list entry that is no address or prefix."""


def parse_prefix(text: str) -> Prefix:
    """``ADDR[/LEN]`` (either family; host bits may be set) as an inany prefix; PolicyError when not one."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as err:
        raise PolicyError(f"{text!r} is not an address or ADDR/LEN prefix: {err}") from None
    length = net.prefixlen + (96 if net.version == 4 else 0)
    mask = ((1 << length) - 1) << (128 - length) if length else 0
    return int.from_bytes(inany.from_packed(net.network_address.packed), "big") & mask, mask


def _matches(prefixes: tuple[Prefix, ...], addr: InAny) -> bool:
    """Whether ``addr`` lies in one of ``prefixes``."""
    value = int.from_bytes(addr, "big")
    return any(value & mask == net for net, mask in prefixes)


class FlowPolicy:
    """What the guest's new flows may address (see the module's docstring)."""

    def __init__(self, deny: tuple[str, ...] = (), allow_link_local: bool = False,
                 broadcast4: frozenset[int] = frozenset({0xFFFFFFFF}), own: frozenset[InAny] = frozenset()) -> None:
        """The operator's ``deny`` list (``ADDR[/LEN]`` texts, already validated by the settings; a bad
        one raises PolicyError); ``allow_link_local`` lifts the default refusal of link-local and metadata
        addresses; ``broadcast4``: the IPv4 broadcast addresses of the guest's network, as ints; ``own``: the
        switch's own addresses on the guest side (never a forwarded flow's target)."""
        self.deny = tuple(parse_prefix(text) for text in deny)
        self.link_local = () if allow_link_local else tuple(parse_prefix(t) for t in LINK_LOCAL + METADATA)
        self.broadcast4 = broadcast4
        self.own = own

    def screen(self, src: InAny, dst: InAny, port: int | None) -> None:
        """Refuse (PacketError) a new flow ``src`` -> ``dst`` by the class of its addresses; ``port``: the
        destination port of TCP and UDP (None for echo)."""
        if inany.is_v4(src):
            first = src[12]
            if first in (0, 127) or first >= 0xE0:
                raise PacketError(DropReason.FLOW_BAD_SOURCE, inany.to_str(src))
        elif src[0] == 0xFF or src == inany.ANY6 or src == inany.LOOPBACK6:
            raise PacketError(DropReason.FLOW_BAD_SOURCE, inany.to_str(src))
        reason = self.refusal(dst)
        if reason is None and port == 0:
            reason = DropReason.FLOW_DST_UNSPECIFIED
        if reason is not None:
            raise PacketError(reason, f"{inany.to_str(dst)} port {port}")

    def refusal(self, dst: InAny) -> DropReason | None:
        """Why no flow may go to ``dst`` by its class alone (None: it may)."""
        if inany.is_v4(dst):
            first = dst[12]
            if first == 0:
                return DropReason.FLOW_DST_UNSPECIFIED
            if first == 127:
                return DropReason.FLOW_DST_LOOPBACK
            if first >= 0xE0 or inany.v4_int(dst) in self.broadcast4:
                return DropReason.FLOW_DST_MULTICAST
            return None
        if dst[0] == 0xFF:
            return DropReason.FLOW_DST_MULTICAST
        if dst == inany.ANY6:
            return DropReason.FLOW_DST_UNSPECIFIED
        if dst == inany.LOOPBACK6:
            return DropReason.FLOW_DST_LOOPBACK
        return None

    def forward_target(self, target: InAny, client: InAny | None = None) -> None:
        """Refuse (PacketError) ``target``, named by a forwarding rule, as the guest side of a flow a host
        ``client`` starts (None: any client of its family, when the rule is added)."""
        reason = self.refusal(target)
        if reason is not None:
            raise PacketError(reason, f"forward target {inany.to_str(target)}")
        if client is not None and inany.is_v4(client) != inany.is_v4(target):
            raise PacketError(DropReason.FLOW_DST_DENIED, f"forward target {inany.to_str(target)} for a client "
                              f"of the other family ({inany.to_str(client)})")
        if target in self.own:
            raise PacketError(DropReason.FLOW_DST_DENIED, f"forward target {inany.to_str(target)} is the "
                              "switch's own address on the guest side")

    def egress(self, dst: InAny) -> None:
        """Refuse (PacketError) a flow to ``dst``, a destination no mapping claimed, by the deny lists."""
        if self.deny and _matches(self.deny, dst):
            raise PacketError(DropReason.FLOW_DST_DENIED, inany.to_str(dst))
        if self.link_local and _matches(self.link_local, dst):
            raise PacketError(DropReason.FLOW_DST_LINK_LOCAL, inany.to_str(dst))
