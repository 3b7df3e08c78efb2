"""What the guest is offered: its addressing, mirrored from the host as passt does.

Theory of operation
-------------------
:func:`resolve_addressing` is a pure function of loaded settings
(:class:`~shardswitch.settings.Config`) and a
:class:`~shardswitch.hostnet.NetInfo` snapshot of the host (default route,
interface address, resolv.conf).  It mirrors the host: the guest gets the
address, prefix length and gateway of the host interface holding the IPv4
default route, and the host's DNS servers and search list;
``-a/-n/-g/-i/--dns/--search`` override each.  The result,
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

import msgspec

from shardswitch import hostnet
from shardswitch.net.params import GuestParams, ParamsError, resolve
from shardswitch.settings import Config, ConfigError

log = logging.getLogger(__name__)


class GuestAddressing(msgspec.Struct, frozen=True, kw_only=True):
    """What the guest is offered (by DHCP), after mirroring and overrides.

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
    #: DNS forwarding: guest traffic to this address's port 53 (UDP and TCP) goes to the host resolvers
    #: ``dns_upstream`` (None: no forwarding).  It is --dns-forward's address, or the gateway when the host's
    #: resolvers are all on its loopback (systemd-resolved's 127.0.0.53, a local dnsmasq) or --dns-host is
    #: given alone.
    dns_forward: str | None = None
    dns_upstream: list[str] = []


def _classful_prefix(address: str) -> int:
    """Return the classful prefix length of ``address`` (passt's fallback when -a has no -n)."""
    first = int(ipaddress.IPv4Address(address)) >> 24
    if first < 128:
        return 8
    if first < 192:
        return 16
    return 24


def _pick_dns(cfg: Config, netinfo: hostnet.NetInfo, gateway: str,
              notes: list[str]) -> tuple[list[str], str | None]:
    """Choose the guest's DNS servers, and the host resolver its queries to the gateway go to (if any).

    --dns, else --dns-forward (IPv4), else the host's non-loopback IPv4
    resolvers.  When the host's resolvers are all on its loopback
    (systemd-resolved, a local dnsmasq), the gateway is offered and its port 53
    is forwarded to the first of them, whatever its loopback address (as
    passt's --dns-host); a note says so.
    """
    if cfg.dns is not None:
        return list(cfg.dns), None
    if cfg.dns_forward is not None and ipaddress.ip_address(cfg.dns_forward).version == 4:
        # As passt: the forwarding address is the guest's resolver; its queries reach the host's.
        return [cfg.dns_forward], None
    if cfg.dns_host is not None and cfg.dns_forward is None:
        # --dns-host alone: the gateway is the guest's resolver, forwarded there.
        return [gateway], cfg.dns_host
    servers = []
    for text in netinfo.nameservers:
        try:
            servers.append(ipaddress.ip_address(text.split("%")[0]))
        except ValueError:
            continue
    ipv4_usable = [str(a) for a in servers if a.version == 4 and not a.is_loopback
                   and not a.is_unspecified and not a.is_multicast]
    if ipv4_usable:
        return ipv4_usable, None
    loopback = [str(a) for a in servers if a.is_loopback]
    if loopback and not any(a.version == 6 and not a.is_loopback for a in servers):
        notes.append(f"the host's resolvers are loopback only ({loopback[0]}): the guest gets the gateway "
                     f"{gateway} as DNS server, and its queries there go to {loopback[0]}")
        return [gateway], loopback[0]
    notes.append("no IPv4 DNS server found in the host's resolv.conf: the guest gets none")
    return [], None


def _dns_forwarding(cfg: Config, netinfo: hostnet.NetInfo, gateway: str,
                    dns_host: str | None) -> tuple[str | None, list[str]]:
    """(the guest-side address whose port 53 is forwarded, the host resolvers it goes to); (None, []) for none.

    --dns-forward goes to --dns-host, else to the host's resolv.conf; without
    it, the resolver :func:`_pick_dns` chose behind the gateway (``dns_host``).
    """
    if cfg.dns_forward is not None:
        return cfg.dns_forward, [cfg.dns_host] if cfg.dns_host is not None else list(netinfo.nameservers)
    if dns_host is not None:
        return gateway, [dns_host]
    return None, []


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


def resolve_addressing(cfg: Config, netinfo: hostnet.NetInfo) -> GuestAddressing:
    """Decide the guest's addressing from the settings and a snapshot of the host.

    Pure: ``netinfo`` comes from :func:`shardswitch.hostnet.read_netinfo`.
    Each of address, prefix length, gateway, DNS and search list is the
    explicit setting if given, else the host's.  A prefix length for an
    explicit address is never taken from the host; without -n it is the
    address's classful length (as in passt).  Raises ConfigError when no
    address or gateway can be found, or they cannot work together.
    """
    route = netinfo.route
    notes: list[str] = []
    address, prefix_len, gateway = cfg.address, cfg.prefix_len, cfg.gateway
    if address is None and route is not None and route.address is not None:
        address = route.address
        if prefix_len is None:
            prefix_len = route.prefix_len
    if gateway is None and route is not None:
        gateway = route.gateway
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
    dns, dns_host = _pick_dns(cfg, netinfo, gateway, notes)
    dns_forward, dns_upstream = _dns_forwarding(cfg, netinfo, gateway, dns_host)
    search = list(cfg.search) if cfg.search is not None else list(netinfo.search)
    interface = cfg.interface or (route.ifname if route is not None else None)
    return GuestAddressing(address=address, prefix_len=prefix_len, gateway=gateway, mtu=cfg.mtu,
                           dns=dns, search=search, mac=cfg.mac, interface=interface, notes=notes,
                           dns_forward=dns_forward, dns_upstream=dns_upstream)


def host_addressing(cfg: Config, resolv_conf: str = hostnet.RESOLV_CONF) -> GuestAddressing:
    """Read the host (netlink, resolv.conf), resolve the guest's addressing and log the choices.

    Raises ConfigError when the host cannot be read or gives no usable
    addressing and the options do not fill the gap.
    """
    try:
        netinfo = hostnet.read_netinfo(cfg.interface, resolv_conf)
    except hostnet.HostNetError as exc:
        raise ConfigError(str(exc)) from None
    addressing = resolve_addressing(cfg, netinfo)
    log.info("guest addressing: %s/%d gateway %s dns %s search %s mtu %d (host interface %s)",
             addressing.address, addressing.prefix_len, addressing.gateway,
             ",".join(addressing.dns) or "-", ",".join(addressing.search) or "-",
             addressing.mtu, addressing.interface or "-")
    for note in addressing.notes:
        log.warning("%s", note)
    return addressing


def guest_params(cfg: Config, addressing: GuestAddressing) -> GuestParams:
    """Return the network layer's GuestParams for this instance, checked by its own rules.

    ``addressing`` gives the network-derived values; ``cfg`` the link
    settings (MTU and the MAC shardswitch uses towards the guest).  Raises
    ConfigError if ``shardswitch.net.params.resolve`` rejects the result
    (for example a prefix length of 0).
    """
    params = GuestParams(address=addressing.address, prefix_len=addressing.prefix_len,
                         gateway=addressing.gateway, mtu=cfg.mtu, dns=list(addressing.dns),
                         search=list(addressing.search), our_mac=cfg.mac)
    try:
        resolve(params)
    except ParamsError as exc:
        raise ConfigError(f"guest parameters: {exc}") from None
    return params
