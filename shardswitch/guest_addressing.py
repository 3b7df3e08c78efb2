"""What the guest is offered: its addressing, mirrored from the host as passt does.

Theory of operation
-------------------
:func:`resolve_addressing` is a pure function of loaded settings
(:class:`~shardswitch.settings.Config`) and a
:class:`~shardswitch.hostnet.NetInfo` snapshot of the host (default route,
interface address, resolv.conf).  It mirrors the host: the guest gets the
address, prefix length and gateway of the host interface holding the IPv4
default route, the global IPv6 address, prefix length and router of the one
holding the IPv6 default route, and the host's DNS servers and search list;
``-a/-n/-g/-i/--dns/--search`` override each, and ``-4``/``-6`` keep one
family.  DNS works by default on hosts whose resolvers are on their loopback
(systemd-resolved): the gateway of each family is offered, and its port 53
forwarded to the host's resolver.  The result,
:class:`GuestAddressing`, carries notes about choices made on the user's
behalf, for the log.  :func:`host_addressing` is the I/O wrapper that reads
the host and calls it; :func:`guest_params` turns the result into the
:class:`~shardswitch.net.params.GuestParams` the network layer consumes,
checked by that layer's own rules.  Every failure is a
:class:`~shardswitch.settings.ConfigError` naming what is missing.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Final

import msgspec

from shardswitch import hostnet
from shardswitch.net import eth, ipv6
from shardswitch.net.params import GuestParams, ParamsError, resolve
from shardswitch.settings import DEFAULT_MTU, Config, ConfigError

log = logging.getLogger(__name__)

#: passt's local mode: the guest's IPv4 address, prefix length and gateway when the host has no IPv4 default
#: route to mirror (an offline laptop, a CI job or a container without a network), libslirp's 10.0.2.x in
#: link-local space.  Also what fills the record with -6 (IPv4 then off).
IPV4_LOCAL: Final = ("169.254.2.1", 16, "169.254.2.2")


class GuestAddressing(msgspec.Struct, frozen=True, kw_only=True):
    """What the guest is offered (by DHCP, DHCPv6 and NDP), after mirroring and overrides.

    ``interface`` is the host interface mirrored (None when nothing was
    taken from the host); ``notes`` are human-readable remarks about choices
    made on the user's behalf, for the log.
    """

    address: str
    prefix_len: int
    gateway: str
    mtu: int
    dns: list[str]
    search: list[str]
    mac: str
    interface: str | None = None
    notes: list[str] = []
    #: DNS forwarding: guest-side address -> the host resolver its port 53 (UDP and TCP) goes to.  The
    #: addresses are --dns-forward's, or the gateways of families whose host resolvers are all on its
    #: loopback (systemd-resolved's 127.0.0.53, a local dnsmasq), or the gateways when --dns-host is given
    #: alone, or a gateway that is itself the host's resolver.
    dns_forward: dict[str, str] = {}
    #: The guest's global IPv6 address and prefix length (None: no global IPv6, link-local only), its
    #: IPv6 router (None: our own link-local address) and IPv6 DNS servers (RDNSS, DHCPv6).
    address6: str | None = None
    prefix6_len: int = 64
    gateway6: str | None = None
    dns6: list[str] = []
    #: The families offered (-4 / -6 turn one off).
    ipv4: bool = True
    ipv6: bool = True


def _classful_prefix(address: str) -> int:
    """Return the classful prefix length of ``address`` (passt's fallback when -a has no -n)."""
    first = int(ipaddress.IPv4Address(address)) >> 24
    if first < 128:
        return 8
    if first < 192:
        return 16
    return 24


def _usable_resolvers(netinfo: hostnet.NetInfo) -> tuple[dict[int, list[str]], list[str]]:
    """The host's resolvers a guest can use directly, per family, and its loopback ones.

    Unusable: unspecified, multicast, and IPv6 link-local ones (their zone
    means nothing to the guest); loopback ones are returned apart.
    """
    usable: dict[int, list[str]] = {4: [], 6: []}
    loopback = []
    for text in netinfo.nameservers:
        try:
            addr = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if addr.is_loopback:
            loopback.append(str(addr))
        elif not (addr.is_unspecified or addr.is_multicast or addr.is_link_local):
            usable[addr.version].append(str(addr))
    return usable, loopback


def _first_of_family(candidates: list[str], address: str) -> str | None:
    """The first of ``candidates`` (host resolvers) of ``address``'s family, else the first at all (passt's
    ``dns_match``); None when there is none.  Scoped (``%zone``) and malformed candidates are skipped."""
    parsed = []
    for text in candidates:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not getattr(addr, "scope_id", None):   # a link-local resolver's zone cannot travel with it
            parsed.append(addr)
    version = ipaddress.ip_address(address).version
    same = [a for a in parsed if a.version == version]
    return str((same or parsed)[0]) if parsed else None


def _pick_dns(cfg: Config, netinfo: hostnet.NetInfo, gateways: dict[int, str | None],
              notes: list[str]) -> tuple[dict[int, list[str]], dict[str, str]]:
    """Choose the guest's DNS servers per family, and the DNS forwarding (passt's rules, both families).

    Returns (servers offered per family, guest-side address -> host resolver
    its port 53 goes to).  Per family, the guest is offered: --dns's servers
    of that family, else --dns-forward's address of that family, else
    (--dns-host alone) the gateway, forwarded there, else the host's usable
    resolvers of that family.  A family left with none while the host has
    resolvers on its loopback (systemd-resolved's 127.0.0.53, a local
    dnsmasq) gets the gateway, forwarded to the first of them, whatever its
    family (as passt's --dns-host).  A host resolver that is the gateway
    itself is forwarded to itself: without that, the gateway would mean the
    host's loopback.  --dns-forward addresses go to --dns-host, else to the
    first resolv.conf server of their family.  ``gateways`` maps 4 and 6 to
    the family's gateway (None: the family is off).
    """
    usable, loopback = _usable_resolvers(netinfo)
    hosts = [a for a in (cfg.dns_host, cfg.dns_host6) if a is not None]
    given = {4: cfg.dns_forward, 6: cfg.dns_forward6}
    explicit = any(given.values())
    offered: dict[int, list[str]] = {4: [], 6: []}
    forward: dict[str, str] = {}
    for version, gateway in gateways.items():
        if gateway is None:
            continue
        address = given[version]
        if cfg.dns is not None:
            offered[version] = [a for a in cfg.dns if ipaddress.ip_address(a).version == version]
        elif address is not None:
            offered[version] = [address]
        elif hosts and not explicit:
            offered[version] = [gateway]
            forward[gateway] = _first_of_family(hosts, gateway) or hosts[0]
        elif usable[version]:
            offered[version] = usable[version]
            if gateway in usable[version]:
                forward[gateway] = gateway
        elif loopback and not explicit:
            offered[version] = [gateway]
            forward[gateway] = loopback[0]
            notes.append(f"the host's resolvers are loopback only ({loopback[0]}): the guest gets the "
                         f"gateway {gateway} as IPv{version} DNS server, and its queries there go to "
                         f"{loopback[0]}")
        if address is not None:
            resolver = _first_of_family(hosts or netinfo.nameservers, address)
            if resolver is not None:
                forward[address] = resolver
    if gateways[4] is not None and not offered[4] and cfg.dns is None:
        notes.append("no IPv4 DNS server found in the host's resolv.conf: the guest gets none")
    return offered, forward


def _missing_addressing(cfg: Config, route: hostnet.HostNet | None,
                        no_address: bool, no_gateway: bool) -> str:
    """Explain why the guest's address and/or gateway could not be mirrored from the host."""
    if route is None:
        reason = "the host has no IPv4 default route"
    elif no_address:
        reason = f"host interface {route.ifname} has no IPv4 address"
    elif cfg.interface is not None:
        reason = f"there is no IPv4 default route via interface {route.ifname}"
    else:
        reason = f"the default route via {route.ifname} has no gateway"
    wanted = [opt for opt, missing in (("an address (-a)", no_address),
                                       ("a gateway (-g)", no_gateway)) if missing]
    return f"cannot choose the guest's addressing: {reason}; give {' and '.join(wanted)}"


def our_link_local(mac: str) -> str:
    """Our IPv6 link-local address towards the guest (from our MAC): its router when none is mirrored."""
    return str(ipaddress.IPv6Address(ipv6.link_local_from_mac(eth.mac_from_str(mac))))


def _mirror(address: str | None, prefix_len: int | None, gateway: str | None,
            route: hostnet.HostNet | None) -> tuple[str | None, int | None, str | None]:
    """Fill what the settings leave unset from the host's ``route`` of that family: its address (with its
    prefix length, unless one was given; a given address never takes the host's) and its gateway."""
    if address is None and route is not None and route.address is not None:
        address = route.address
        if prefix_len is None:
            prefix_len = route.prefix_len
    if gateway is None and route is not None:
        gateway = route.gateway
    return address, prefix_len, gateway


def _ipv4_addressing(cfg: Config, route: hostnet.HostNet | None, notes: list[str]) -> tuple[str, int, str]:
    """(address, prefix length, gateway) for IPv4: the settings, else the host's, else (no default route, no
    -i, -a or -g: nothing to mirror) passt's local mode, :data:`IPV4_LOCAL`; ConfigError if only part of it
    can be found."""
    if route is None and cfg.interface is None and cfg.outbound_if4 is None and cfg.address is None \
            and cfg.gateway is None:
        local, local_len, local_gw = IPV4_LOCAL
        length = local_len if cfg.prefix_len is None else cfg.prefix_len
        notes.append(f"the host has no IPv4 default route: local mode, the guest gets {local}/{length} and "
                     f"gateway {local_gw} (give -a and -g to choose others)")
        return local, length, local_gw
    address, prefix_len, gateway = _mirror(cfg.address, cfg.prefix_len, cfg.gateway, route)
    if address is None or gateway is None:
        raise ConfigError(_missing_addressing(cfg, route, address is None, gateway is None))
    if prefix_len is None:
        prefix_len = _classful_prefix(address)
        notes.append(f"no prefix length for address {address}: using classful /{prefix_len}")
    if address == gateway:
        raise ConfigError(f"the guest's address and gateway are both {address}")
    network = ipaddress.IPv4Network(f"{address}/{prefix_len}", strict=False)
    if prefix_len < 31 and ipaddress.IPv4Address(address) in (network.network_address,
                                                              network.broadcast_address):
        raise ConfigError(f"address {address} is the network or broadcast address of {network}")
    if ipaddress.IPv4Address(gateway) not in network:
        notes.append(f"gateway {gateway} is outside the guest's network {network}")
    return address, prefix_len, gateway


def _ipv6_addressing(cfg: Config, route6: hostnet.HostNet | None,
                     notes: list[str]) -> tuple[str | None, int, str | None]:
    """(address, prefix length, router) for IPv6: the settings, else the host's global address on its
    IPv6 default-route interface and its gateway.  No address means link-local only (a note says so)."""
    address6, prefix6_len, gateway6 = _mirror(cfg.address6, cfg.prefix6_len, cfg.gateway6, route6)
    if address6 is None:
        notes.append("the host has no global IPv6 address on an interface with an IPv6 default route: "
                     "the guest gets link-local IPv6 only (give -a with an IPv6 address)")
    if address6 is not None and address6 == gateway6:
        raise ConfigError(f"the guest's IPv6 address and gateway are both {address6}")
    return address6, prefix6_len or 64, gateway6


def resolve_addressing(cfg: Config, netinfo: hostnet.NetInfo) -> GuestAddressing:
    """Decide the guest's addressing from the settings and a snapshot of the host.

    Pure: ``netinfo`` comes from :func:`shardswitch.hostnet.read_netinfo`.
    Each of address, prefix length, gateway (per family), DNS and search list
    is the explicit setting if given, else the host's.  A prefix length for
    an explicit IPv4 address is never taken from the host; without -n it is
    the address's classful length (as in passt).  A family without a default
    route gets passt's local mode: IPv4 169.254.2.1/16 via 169.254.2.2, IPv6
    link-local only (our link-local address is its router).  With -6 the
    IPv4 part is still resolved, but IPv4 is off in the guest.  Raises
    ConfigError when only part of the IPv4 addressing can be found (a given
    address without a gateway, an interface without an address...), or the
    values cannot work together.
    """
    notes: list[str] = []
    ipv4, ipv6 = not cfg.ipv6_only, not cfg.ipv4_only
    try:
        address, prefix_len, gateway = _ipv4_addressing(cfg, netinfo.route, notes)
    except ConfigError:
        if ipv4:
            raise
        address, prefix_len, gateway = IPV4_LOCAL
    address6, prefix6_len, gateway6 = None, 64, None
    if ipv6:
        address6, prefix6_len, gateway6 = _ipv6_addressing(cfg, netinfo.route6, notes)
    router6 = gateway6 if gateway6 is not None else our_link_local(cfg.mac)
    dns, dns_forward = _pick_dns(cfg, netinfo, {4: gateway if ipv4 else None, 6: router6 if ipv6 else None},
                                 notes)
    search = list(cfg.search) if cfg.search is not None else list(netinfo.search)
    route = netinfo.route if ipv4 else netinfo.route6
    interface = cfg.interface or (route.ifname if route is not None else None)
    if not ipv4 and address6 is None:
        notes.append("-6 and no global IPv6 address on the host: the guest gets link-local IPv6 only "
                     "(give -a with an IPv6 address)")
    return GuestAddressing(address=address, prefix_len=prefix_len, gateway=gateway, mtu=cfg.mtu,
                           dns=dns[4], search=search, mac=cfg.mac, interface=interface, notes=notes,
                           dns_forward=dns_forward, address6=address6, prefix6_len=prefix6_len,
                           gateway6=gateway6, dns6=dns[6], ipv4=ipv4, ipv6=ipv6)


def host_addressing(cfg: Config, resolv_conf: str = hostnet.RESOLV_CONF) -> GuestAddressing:
    """Read the host (netlink, resolv.conf), resolve the guest's addressing and log the choices.

    Raises ConfigError when the host cannot be read or gives no usable
    addressing and the options do not fill the gap.
    """
    try:
        netinfo = hostnet.read_netinfo(cfg.interface or cfg.outbound_if4, cfg.interface or cfg.outbound_if6,
                                       resolv_conf)
    except hostnet.HostNetError as exc:
        raise ConfigError(str(exc)) from None
    addressing = resolve_addressing(cfg, netinfo)
    if addressing.ipv4:
        log.info("guest IPv4: %s/%d gateway %s dns %s", addressing.address, addressing.prefix_len,
                 addressing.gateway, ",".join(addressing.dns) or "-")
    if addressing.ipv6:
        log.info("guest IPv6: %s router %s dns %s",
                 f"{addressing.address6}/{addressing.prefix6_len}" if addressing.address6 else "link-local only",
                 addressing.gateway6 or "our link-local address", ",".join(addressing.dns6) or "-")
    log.info("guest search %s mtu %s (host interface %s)", ",".join(addressing.search) or "-",
             addressing.mtu or "not offered", addressing.interface or "-")
    for note in addressing.notes:
        log.warning("%s", note)
    return addressing


def guest_params(cfg: Config, addressing: GuestAddressing) -> GuestParams:
    """Return the network layer's GuestParams for this instance, checked by its own rules.

    ``addressing`` gives the network-derived values; ``cfg`` the link
    settings (MTU and the MAC shardswitch uses towards the guest) and what
    DHCP, DHCPv6 and NDP offer beyond addresses: with ``--no-dhcp-dns`` /
    ``--no-dhcp-search`` no DNS servers / search list (DNS forwarding still
    works), with ``-m 0`` no MTU (the data path then sizes frames for the
    largest, as passt), the host name and FQDN.  Raises
    ConfigError if ``shardswitch.net.params.resolve`` rejects the result
    (for example a prefix length of 0).
    """
    dns = not cfg.no_dhcp_dns
    params = GuestParams(address=addressing.address, prefix_len=addressing.prefix_len,
                         gateway=addressing.gateway, mtu=cfg.mtu or DEFAULT_MTU,
                         dns=list(addressing.dns) if dns else [],
                         search=[] if cfg.no_dhcp_search else list(addressing.search), our_mac=cfg.mac,
                         address6=addressing.address6 or "", prefix6_len=addressing.prefix6_len,
                         gateway6=addressing.gateway6 or "", dns6=list(addressing.dns6) if dns else [],
                         offer_mtu=cfg.mtu != 0, hostname=cfg.hostname or "", fqdn=cfg.fqdn or "")
    try:
        resolve(params)
    except ParamsError as exc:
        raise ConfigError(f"guest parameters: {exc}") from None
    return params
