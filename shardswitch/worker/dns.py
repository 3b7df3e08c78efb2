"""DNS forwarding: where guest traffic to the ``--dns-forward`` address really goes.

Theory of operation.  ``--dns-forward ADDR`` makes ADDR a resolver for the
guest (DHCP offers it when ``--dns`` is not given) although nothing answers
on ADDR: a guest flow whose destination is ADDR port 53 gets a host socket
connected to the first of the host's resolvers (resolv.conf) of the same
address family, port 53 - or, failing that, to the first resolver at all.
The flow keeps ADDR as the address the guest talks to, so replies reach the
guest from ADDR:53, as passt does (``dns_match``/``dns_host`` in fwd.c).

This is pure: :class:`DnsForward` only rewrites destinations.  UDP flows
(:mod:`shardswitch.worker.udp`) use it for port 53; the TCP flows should
call the same :meth:`DnsForward.target` when they choose the host side of a
guest connection.
"""

from __future__ import annotations

import ipaddress

#: The DNS port.
DNS_PORT = 53


class DnsForward:
    """The ``--dns-forward`` address and the host resolvers its queries go to."""

    def __init__(self, forward: str, upstream: tuple[str, ...]) -> None:
        """``forward``: the guest-side address ("" = none); ``upstream``: the host's resolvers."""
        self.forward: bytes | None = None
        self.upstream: str | None = None
        if not forward or not upstream:
            return
        addr = ipaddress.ip_address(forward)
        self.forward = addr.packed
        valid = []
        for text in upstream:
            try:
                valid.append(ipaddress.ip_address(text.split("%")[0]))
            except ValueError:
                continue
        same = [u for u in valid if u.version == addr.version]
        if same or valid:
            self.upstream = str((same or valid)[0])

    def target(self, dst: bytes, port: int) -> tuple[str, int] | None:
        """The host address and port for guest traffic to ``dst``:``port``, or None if not DNS-forwarded.

        ``dst`` is the packed destination (4 or 16 bytes) the guest used.
        """
        if port != DNS_PORT or self.upstream is None or dst != self.forward:
            return None
        return self.upstream, DNS_PORT
