"""Address translation between the guest's view and the host's: passt's fwd.c.

Theory of operation.  The guest sees one network; the host sockets that carry
its flows see another.  Every protocol asks this module, in both directions,
instead of building the mapping itself:

* guest -> host (:meth:`Forwarding.to_host`): where a flow the guest starts
  really goes.  A destination that is a *mapped* address
  (``--map-host-loopback``, the gateway and our IPv6 link-local address by
  default) means the host itself: the host's loopback of that family.  The
  ``--dns-forward`` address on port 53 means the host's resolver (the first of
  resolv.conf's of the same family, else the first at all; passt's
  ``dns_match``).  Anything else goes where the guest sent it.
* host -> guest (:meth:`Forwarding.seen_from`): the address a host client of
  a forwarded port (``-t``/``-u``) appears to come from.  A client on the
  host's loopback appears as the first mapped address of its family (the
  reverse of the mapping above; None when there is none); others as
  themselves.
* the guest's own address as a forwarded flow's target
  (:meth:`Forwarding.guest_address`): its IPv4 address, and for IPv6 the
  global address it last used (learnt from the flows it starts), else the
  configured one, else its link-local address from its MAC.

Addresses are 16-byte :mod:`~shardswitch.net.inany` values throughout; the
flow's socket and frame builders take them as they are.
"""

from __future__ import annotations

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


class Forwarding:
    """The guest <-> host address mapping of one worker."""

    def __init__(self, port: WorkerPort, mapped: tuple[str, ...], dns_forward: str = "",
                 dns_upstream: tuple[str, ...] = ()) -> None:
        """``mapped``: addresses meaning the host's loopback; ``dns_forward``: the guest-side DNS address
        ("" = none); ``dns_upstream``: the host's resolvers."""
        self.port = port
        ordered = _parse_all(mapped)
        #: Addresses that stand for the host's loopback.
        self.mapped = frozenset(ordered)
        #: What a loopback client of each family appears as (None: nothing is mapped in that family).
        self.shown4 = next((a for a in ordered if inany.is_v4(a)), None)
        self.shown6 = next((a for a in ordered if not inany.is_v4(a)), None)
        self.dns_forward: InAny | None = inany.from_str(dns_forward) if dns_forward else None
        self.dns_upstream: InAny | None = None
        upstream = _parse_all(dns_upstream)
        if self.dns_forward is not None and upstream:
            v4 = inany.is_v4(self.dns_forward)
            same = [a for a in upstream if inany.is_v4(a) == v4]
            self.dns_upstream = (same or upstream)[0]
        #: The guest's global IPv6 address as last seen (None: not seen yet).
        self.guest6: InAny | None = port.params.address6

    def to_host(self, dst: InAny, port: int) -> tuple[InAny, int]:
        """Where guest traffic to ``dst``:``port`` goes on the host (``port`` 0 for echo)."""
        if port == DNS_PORT and dst == self.dns_forward and self.dns_upstream is not None:
            return self.dns_upstream, DNS_PORT
        if dst in self.mapped:
            return inany.loopback_like(dst), port
        return dst, port

    def seen_from(self, client: InAny) -> InAny | None:
        """The address a host client appears to come from in the guest (None: it cannot appear)."""
        if inany.is_loopback(client):
            return self.shown4 if inany.is_v4(client) else self.shown6
        return client

    def learn_guest(self, src: InAny) -> None:
        """A flow the guest started from ``src``: remember its global IPv6 address (unicast sources only)."""
        if (src == self.guest6 or inany.is_v4(src) or ipv6.is_unspecified(src) or ipv6.is_multicast(src)
                or (ipv6.is_link_local(src) and self.guest6 is not None)):
            return
        self.guest6 = src

    def guest_address(self, v4: bool) -> InAny | None:
        """The guest's address of one family, as the target of a forwarded flow (None: not known)."""
        params = self.port.params
        if v4:
            return inany.from_v4(params.address)
        if self.guest6 is not None:
            return self.guest6
        mac = self.port.guest_mac
        return ipv6.link_local_from_mac(mac) if mac is not None else None
