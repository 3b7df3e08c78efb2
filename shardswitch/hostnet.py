"""Reading the host's IPv4 addressing (netlink) and resolver settings (resolv.conf).

Theory of operation
-------------------
By default shardswitch mirrors the host to the guest, as passt does: the
guest gets the address, prefix length and gateway of the host interface that
holds the IPv4 default route, and the host's DNS servers and search list.
This module gathers those facts; ``shardswitch.guest_addressing.resolve_addressing``
decides what the guest gets.

Netlink is read with pyroute2's ``IPRoute`` in three dumps (IPv4 routes,
IPv4 addresses, links).  The messages are first reduced to small records
(:class:`RouteEntry`, :class:`AddrEntry`) and the choice is made by the pure
function :func:`select_host_net`, so the selection rules are testable
without a network namespace:

* the default route is a main-table unicast IPv4 route with prefix length 0;
  among several, the lowest metric wins (the kernel's choice); a multipath
  route counts as one route per next hop, the first hop winning ties;
* given an interface name (``-i``), that interface is used whether or not
  a default route goes through it; the gateway is then that of the best
  default route via the interface, if any;
* the address is the interface's primary (not secondary) IPv4 address,
  preferring one whose network contains the gateway.

pyroute2 is imported inside :func:`host_default_route` only: it is the one
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
    """Interface address flags (linux/if_addr.h)."""

    SECONDARY = 0x01


class HostNetError(Exception):
    """The host's network settings could not be read, or the named interface does not exist."""


class HostNet(msgspec.Struct, frozen=True, kw_only=True):
    """The host interface to mirror: its name, primary IPv4 address/prefix and default gateway."""

    ifname: str
    address: str | None = None
    prefix_len: int | None = None
    gateway: str | None = None


class NetInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Snapshot of the host's addressing and resolver settings."""

    route: HostNet | None
    nameservers: list[str] = []
    search: list[str] = []


class RouteEntry(msgspec.Struct, frozen=True):
    """One IPv4 default route, reduced to what the selection needs."""

    oif: int
    gateway: str | None
    metric: int


class AddrEntry(msgspec.Struct, frozen=True):
    """One IPv4 interface address, reduced to what the selection needs."""

    index: int
    address: str
    prefix_len: int
    secondary: bool


def _pick_address(addrs: Iterable[AddrEntry], index: int, gateway: str | None) -> AddrEntry | None:
    """Return the primary address of interface ``index``, preferring one on the gateway's network."""
    primary = [a for a in addrs if a.index == index and not a.secondary]
    if gateway is not None:
        gw = ipaddress.IPv4Address(gateway)
        for addr in primary:
            if gw in ipaddress.IPv4Network(f"{addr.address}/{addr.prefix_len}", strict=False):
                return addr
    return primary[0] if primary else None


def select_host_net(routes: Iterable[RouteEntry], addrs: Iterable[AddrEntry],
                    links: Mapping[int, str], ifname: str | None) -> HostNet | None:
    """Choose the interface, address and gateway to mirror (pure; rules in the module docstring).

    ``routes`` are IPv4 default routes, ``links`` maps interface index to
    name.  Returns None when ``ifname`` is None and there is no default
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
    """Reduce pyroute2 route messages (or dicts alike) to main-table IPv4 default routes."""
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


def _addr_entries(messages: Iterable[Any]) -> list[AddrEntry]:
    """Reduce pyroute2 address messages (or dicts alike) to AddrEntry records."""
    entries = []
    for msg in messages:
        address = msg.get("local") or msg.get("address")
        if address is None:
            continue
        flags = msg.get("flags") or 0
        entries.append(AddrEntry(index=msg["index"], address=address, prefix_len=msg["prefixlen"],
                                 secondary=bool(flags & AddrFlag.SECONDARY)))
    return entries


def host_default_route(ifname: str | None) -> HostNet | None:
    """Read the host's IPv4 default-route interface (or interface ``ifname``) over netlink.

    Returns None when ``ifname`` is None and the host has no IPv4 default
    route.  Raises HostNetError when netlink cannot be read or ``ifname``
    does not exist.  Runs in the caller's network namespace.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            routes = _route_entries(ipr.route("dump", family=socket.AF_INET))
            addrs = _addr_entries(ipr.addr("dump", family=socket.AF_INET))
            links = {link["index"]: link.get("ifname") for link in ipr.link("dump")}
    except (NetlinkError, OSError) as exc:
        raise HostNetError(f"cannot read the host's network settings over netlink: {exc}") from None
    return select_host_net(routes, addrs, links, ifname)


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


def read_netinfo(ifname: str | None, resolv_conf: str = RESOLV_CONF) -> NetInfo:
    """Take a snapshot of the host: default-route interface (or ``ifname``) and resolver settings."""
    nameservers, search = read_resolv_conf(resolv_conf)
    return NetInfo(route=host_default_route(ifname), nameservers=nameservers, search=search)
