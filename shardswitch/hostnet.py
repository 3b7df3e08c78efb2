"""Reading the host's addressing (netlink, IPv4 and IPv6) and resolver settings (resolv.conf).

Theory of operation
-------------------
By default shardswitch mirrors the host to the guest, as passt does: for each
of IPv4 and IPv6, the guest gets the address, prefix length and gateway of
the host interface that holds that family's default route, and the host's
DNS servers and search list.  This module gathers those facts;
``shardswitch.guest_addressing.resolve_addressing`` decides what the guest
gets.

Netlink is read with pyroute2's ``IPRoute``: per family a route dump and an
address dump, plus one link dump.  The messages are first reduced to small
records (:class:`RouteEntry`, :class:`AddrEntry`) and the choice is made by
the pure function :func:`select_host_net`, the same for both families, so
the selection rules are testable without a network namespace:

* the default route is a main-table unicast route with prefix length 0;
  among several, the lowest metric wins (the kernel's choice); a multipath
  route counts as one route per next hop, the first hop winning ties;
* given an interface name (``-i``), that interface is used whether or not
  a default route goes through it; the gateway is then that of the best
  default route via the interface, if any;
* the address is the interface's primary address, preferring one whose
  network contains the gateway.  For IPv4, secondary addresses are skipped;
  for IPv6 only global-scope addresses count, and temporary (privacy),
  deprecated and DAD-failed ones are skipped.  An IPv6 gateway is usually
  link-local (``fe80::1`` learnt from the router's advertisements): it
  contains no address, so the first global one is taken.

pyroute2 is imported inside :func:`host_default_routes` only: it is the one
slow import of the program, and ``--print-capabilities`` or ``status`` do
not need it.

:func:`parse_resolv_conf` is a pure parser of resolv.conf text (glibc rules:
comment lines start with ``#`` or ``;``, every ``nameserver`` line adds one
server, the last ``search`` or ``domain`` line gives the search list).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from enum import IntEnum, IntFlag
from typing import Any, Final

import msgspec

RESOLV_CONF: Final = "/etc/resolv.conf"


class RouteTable(IntEnum):
    """Routing table ids (linux/rtnetlink.h)."""

    MAIN = 254


class RouteType(IntEnum):
    """Route types (linux/rtnetlink.h)."""

    UNICAST = 1


class AddrFlag(IntFlag):
    """Interface address flags (linux/if_addr.h); 0x01 is SECONDARY for IPv4, TEMPORARY for IPv6."""

    SECONDARY = 0x01
    TEMPORARY = 0x01
    DADFAILED = 0x08
    DEPRECATED = 0x20


class AddrScope(IntEnum):
    """Address scopes (linux/rtnetlink.h, rt_scope_t)."""

    UNIVERSE = 0


#: IPv6 address flags that make an address unfit to mirror (0x01 is TEMPORARY for IPv6).
_UNFIT6: Final = AddrFlag.TEMPORARY | AddrFlag.DADFAILED | AddrFlag.DEPRECATED


class HostNetError(Exception):
    """The host's network settings could not be read, or the named interface does not exist."""


class HostNet(msgspec.Struct, frozen=True, kw_only=True):
    """The host interface to mirror for one family: its name, primary address/prefix and default gateway."""

    ifname: str
    address: str | None = None
    prefix_len: int | None = None
    gateway: str | None = None


class NetInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Snapshot of the host's addressing (``route``: IPv4, ``route6``: IPv6) and resolver settings."""

    route: HostNet | None
    route6: HostNet | None = None
    nameservers: list[str] = []
    search: list[str] = []


class RouteEntry(msgspec.Struct, frozen=True):
    """One default route (either family), reduced to what the selection needs."""

    oif: int
    gateway: str | None
    metric: int


class AddrEntry(msgspec.Struct, frozen=True):
    """One interface address (either family), reduced to what the selection needs.

    ``secondary``: not to be mirrored when another address qualifies (an IPv4
    secondary address; IPv6 temporary, deprecated or DAD-failed ones are not
    listed at all).
    """

    index: int
    address: str
    prefix_len: int
    secondary: bool


def _pick_address(addrs: Iterable[AddrEntry], index: int, gateway: str | None) -> AddrEntry | None:
    """Return the primary address of interface ``index``, preferring one on the gateway's network."""
    primary = [a for a in addrs if a.index == index and not a.secondary]
    if gateway is not None:
        gw = ipaddress.ip_address(gateway.split("%")[0])
        for addr in primary:
            if gw in ipaddress.ip_network(f"{addr.address}/{addr.prefix_len}", strict=False):
                return addr
    return primary[0] if primary else None


def select_host_net(routes: Iterable[RouteEntry], addrs: Iterable[AddrEntry],
                    links: Mapping[int, str], ifname: str | None) -> HostNet | None:
    """Choose the interface, address and gateway to mirror (pure; rules in the module docstring).

    ``routes`` are default routes and ``addrs`` addresses of one family,
    ``links`` maps interface index to name.  Returns None when ``ifname`` is None and there is no default
    route; raises HostNetError when ``ifname`` names no interface.
    """
    by_metric = sorted(routes, key=lambda r: r.metric)
    if ifname is None:
        best = next((r for r in by_metric if r.oif in links), None)
        if best is None:
            return None
        index = best.oif
    else:
        matches = [i for i, name in links.items() if name == ifname]
        if not matches:
            raise HostNetError(f"there is no network interface named {ifname!r}")
        index = matches[0]
        best = next((r for r in by_metric if r.oif == index), None)
    gateway = best.gateway if best is not None else None
    addr = _pick_address(list(addrs), index, gateway)
    return HostNet(ifname=links[index], address=addr.address if addr else None,
                   prefix_len=addr.prefix_len if addr else None, gateway=gateway)


def _route_entries(messages: Iterable[Any]) -> list[RouteEntry]:
    """Reduce pyroute2 route messages (or dicts alike) to main-table default routes."""
    entries = []
    for msg in messages:
        if (msg["dst_len"] != 0 or msg["type"] != RouteType.UNICAST
                or msg.get("table") != RouteTable.MAIN):
            continue
        metric = msg.get("priority") or 0
        hops = msg.get("multipath")
        if hops:
            entries += [RouteEntry(oif=hop["oif"], gateway=hop.get("gateway"), metric=metric)
                        for hop in hops]
        elif msg.get("oif") is not None:
            entries.append(RouteEntry(oif=msg.get("oif"), gateway=msg.get("gateway"), metric=metric))
    return entries


def _addr_entries(messages: Iterable[Any], family: int = socket.AF_INET) -> list[AddrEntry]:
    """Reduce pyroute2 address messages (or dicts alike) of ``family`` to AddrEntry records.

    IPv6: only global-scope addresses, and none that is temporary, deprecated or DAD-failed.
    """
    entries = []
    for msg in messages:
        address = msg.get("local") or msg.get("address")
        if address is None:
            continue
        flags = msg.get("flags") or 0
        if family == socket.AF_INET6:
            if (msg.get("scope") or 0) != AddrScope.UNIVERSE or flags & _UNFIT6:
                continue
            flags = 0
        entries.append(AddrEntry(index=msg["index"], address=address, prefix_len=msg["prefixlen"],
                                 secondary=bool(flags & AddrFlag.SECONDARY)))
    return entries


def host_default_routes(ifname: str | None, ifname6: str | None) -> tuple[HostNet | None, HostNet | None]:
    """Read the host's IPv4 and IPv6 default-route interfaces (or interface ``ifname`` for IPv4, ``ifname6``
    for IPv6, when named) over netlink.

    Each is None when its interface name is None and the host has no default
    route of that family.  Raises HostNetError when netlink cannot be read or
    a named interface does not exist.  Runs in the caller's network namespace.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    found: dict[int, tuple[list[RouteEntry], list[AddrEntry]]] = {}
    try:
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                found[family] = (_route_entries(ipr.route("dump", family=family)),
                                 _addr_entries(ipr.addr("dump", family=family), family))
            links = {link["index"]: link.get("ifname") for link in ipr.link("dump")}
    except (NetlinkError, OSError) as exc:
        raise HostNetError(f"cannot read the host's network settings over netlink: {exc}") from None
    routes4, addrs4 = found[socket.AF_INET]
    routes6, addrs6 = found[socket.AF_INET6]
    return (select_host_net(routes4, addrs4, links, ifname),
            select_host_net(routes6, addrs6, links, ifname6))


def parse_resolv_conf(text: str) -> tuple[list[str], list[str]]:
    """Return (nameservers, search domains) from resolv.conf text.

    Nameservers keep their order, without duplicates; lines whose address
    does not parse are skipped (IPv6 ones, with an optional ``%zone``, are
    kept: callers pick the family they need).  The last ``search`` or
    ``domain`` line gives the search list, trailing dots removed.
    """
    servers: list[str] = []
    search: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0][0] in "#;":
            continue
        keyword, args = words[0], words[1:]
        if keyword == "nameserver" and args:
            try:
                server = str(ipaddress.ip_address(args[0]))
            except ValueError:
                continue
            if server not in servers:
                servers.append(server)
        elif keyword in ("search", "domain"):
            search = []
            for word in args:
                if word[0] in "#;":
                    break
                domain = word.rstrip(".")
                if domain and domain not in search:
                    search.append(domain)
    return servers, search


def read_resolv_conf(path: str = RESOLV_CONF) -> tuple[list[str], list[str]]:
    """Read and parse a resolv.conf; a missing file means no servers and no search list."""
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return parse_resolv_conf(stream.read())
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise HostNetError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_netinfo(ifname: str | None, ifname6: str | None, resolv_conf: str = RESOLV_CONF) -> NetInfo:
    """Take a snapshot of the host: default-route interfaces (or ``ifname`` for IPv4 / ``ifname6`` for IPv6,
    see :func:`host_default_routes`) and resolver settings."""
    nameservers, search = read_resolv_conf(resolv_conf)
    route, route6 = host_default_routes(ifname, ifname6)
    return NetInfo(route=route, route6=route6, nameservers=nameservers, search=search)
