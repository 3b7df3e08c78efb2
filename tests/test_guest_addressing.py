"""Tests of shardswitch.guest_addressing: the guest's addressing mirrored from a host snapshot, GuestParams."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shardswitch import guest_addressing, hostnet
from shardswitch.guest_addressing import GuestAddressing, resolve_addressing
from shardswitch.hostnet import HostNet, NetInfo
from shardswitch.settings import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("runtime_dir")


# ------------------------------------------------------------------ resolve_addressing

HOST = HostNet(ifname="eth0", address="10.99.0.2", prefix_len=24, gateway="10.99.0.1")
HOST6 = HostNet(ifname="eth0", address="2001:db8:99::2", prefix_len=64, gateway="fe80::1")


def netinfo(route: HostNet | None = HOST, nameservers: list[str] | None = None,
            search: list[str] | None = None, route6: HostNet | None = HOST6) -> NetInfo:
    """Build a host snapshot for resolve_addressing (dual-stack by default)."""
    return NetInfo(route=route, route6=route6, nameservers=["192.0.2.53"] if nameservers is None else nameservers,
                   search=["corp.example"] if search is None else search)


def resolve(info: NetInfo, **options: Any) -> GuestAddressing:
    """Load options and resolve them against ``info``."""
    return resolve_addressing(load_config(options), info)


def test_mirrors_the_host() -> None:
    """By default the guest gets the host's address, prefix, gateway, DNS and search list."""
    got = resolve(netinfo())
    assert got == GuestAddressing(address="10.99.0.2", prefix_len=24, gateway="10.99.0.1", mtu=65520,
                                  dns=["192.0.2.53"], search=["corp.example"], mac="9a:55:9a:55:9a:55",
                                  interface="eth0", notes=[], address6="2001:db8:99::2", prefix6_len=64,
                                  gateway6="fe80::1", dns6=[])


def test_options_override_the_host() -> None:
    """-a/-n/-g/--dns/--search/-m/-M replace the host's values."""
    got = resolve(netinfo(), address="172.16.5.9", prefix_len="255.255.0.0", gateway="172.16.0.1",
                  dns=["198.51.100.7"], search=["lab.example"], mtu=1500, mac="02:00:00:00:00:01")
    assert (got.address, got.prefix_len, got.gateway) == ("172.16.5.9", 16, "172.16.0.1")
    assert (got.dns, got.search, got.mtu, got.mac) == (["198.51.100.7"], ["lab.example"], 1500,
                                                       "02:00:00:00:00:01")


def test_explicit_address_gets_classful_prefix_not_the_hosts() -> None:
    """-a without -n: classful length (as passt), with a note."""
    got = resolve(netinfo(), address="172.16.5.9")
    assert (got.prefix_len, got.gateway) == (16, "10.99.0.1")
    assert any("classful /16" in n for n in got.notes)
    assert any("outside the guest's network" in n for n in got.notes)


def test_empty_lists_mean_none() -> None:
    """dns = [] / search = [] give the guest none, without looking at the host."""
    got = resolve(netinfo(), dns=[], search=[])
    assert (got.dns, got.search, got.notes) == ([], [], [])


def test_dns_per_family_skips_loopback_and_link_local() -> None:
    """Each family gets the host's usable resolvers of that family; loopback and link-local ones are not
    offered when a usable one exists."""
    got = resolve(netinfo(nameservers=["127.0.0.53", "2001:db8::1", "fe80::53%eth0", "192.0.2.9", "192.0.2.10"]))
    assert (got.dns, got.dns6, got.dns_forward) == (["192.0.2.9", "192.0.2.10"], ["2001:db8::1"], {})


def test_loopback_only_resolvers_give_the_gateway() -> None:
    """systemd-resolved style hosts: each family's gateway is offered, forwarded to the stub, with a note."""
    got = resolve(netinfo(nameservers=["127.0.0.53", "::1"]))
    assert (got.dns, got.dns6) == (["10.99.0.1"], ["fe80::1"])
    assert got.dns_forward == {"10.99.0.1": "127.0.0.53", "fe80::1": "127.0.0.53"}
    assert any("loopback only (127.0.0.53)" in n for n in got.notes)


def test_without_ipv6_router_our_link_local_address_is_the_ipv6_resolver() -> None:
    """No IPv6 default route: the guest has link-local IPv6 only (noted), and our link-local address, its
    router, is the IPv6 resolver forwarded to the stub."""
    got = resolve(netinfo(nameservers=["127.0.0.53"], route6=None))
    assert (got.address6, got.gateway6, got.dns6) == (None, None, ["fe80::9855:9aff:fe55:9a55"])
    assert any("link-local IPv6 only" in n for n in got.notes)


@pytest.mark.parametrize(("nameservers", "dns", "dns6", "upstream"), [
    (["::1"], ["10.99.0.1"], ["fe80::1"], ["::1"]),
    (["127.0.0.1", "192.0.2.53"], ["192.0.2.53"], ["fe80::1"], ["127.0.0.1"]),
    (["127.0.0.53", "2001:db8::53"], ["10.99.0.1"], ["2001:db8::53"], ["127.0.0.53"]),
    (["192.0.2.53", "2001:db8::53"], ["192.0.2.53"], ["2001:db8::53"], []),
])
def test_dns_host_for_each_family_without_a_usable_resolver(nameservers: list[str], dns: list[str],
                                                            dns6: list[str], upstream: list[str]) -> None:
    """A family without a usable resolver gets its gateway, forwarded to the first loopback resolver
    (of either family)."""
    got = resolve(netinfo(nameservers=nameservers))
    forward = {gw: upstream[0] for gw, offered in (("10.99.0.1", dns), ("fe80::1", dns6)) if offered == [gw]}
    assert (got.dns, got.dns6, got.dns_forward) == (dns, dns6, forward)


def test_explicit_dns_means_no_dns_host() -> None:
    """--dns wins: nothing is forwarded implicitly; its IPv6 servers are the guest's IPv6 ones."""
    got = resolve(netinfo(nameservers=["127.0.0.53"]), dns=["10.99.0.53", "2001:db8::53"])
    assert (got.dns, got.dns6, got.dns_forward) == (["10.99.0.53"], ["2001:db8::53"], {})


def test_ipv6_mirrored_and_overridden() -> None:
    """The host's global IPv6 address, prefix and router by default; -a ADDR/LEN and -g override them."""
    got = resolve(netinfo(), address=["2001:db8:5::5/56"], gateway=["2001:db8:5::1"])
    assert (got.address6, got.prefix6_len, got.gateway6) == ("2001:db8:5::5", 56, "2001:db8:5::1")
    assert resolve(netinfo(), address=["2001:db8:5::5"]).prefix6_len == 64
    with pytest.raises(ConfigError, match="IPv6 address and gateway are both 2001:db8:5::5"):
        resolve(netinfo(), address=["2001:db8:5::5"], gateway=["2001:db8:5::5"])


def test_one_family_only() -> None:
    """-4: no IPv6 (nor IPv6 DNS); -6: IPv4 off (local-mode values fill the record when the host has no IPv4),
    and without a host IPv6 address link-local IPv6 only, as passt's local mode."""
    got = resolve(netinfo(nameservers=["127.0.0.53"]), ipv4_only=True)
    assert (got.ipv4, got.ipv6, got.address6, got.dns6, got.dns_forward) == (True, False, None, [],
                                                                              {"10.99.0.1": "127.0.0.53"})
    got = resolve(netinfo(route=None, nameservers=["127.0.0.53"]), ipv6_only=True)
    assert (got.ipv4, got.ipv6, got.address6, got.dns, got.dns_forward) == (False, True, "2001:db8:99::2", [],
                                                                            {"fe80::1": "127.0.0.53"})
    assert got.interface == "eth0"
    got = resolve(netinfo(route6=None), ipv6_only=True)
    assert (got.ipv4, got.ipv6, got.address6, got.gateway6) == (False, True, None, None)
    assert any("link-local IPv6 only" in note for note in got.notes)


def test_no_resolvers() -> None:
    """No usable DNS server: none offered, with a note."""
    got = resolve(netinfo(nameservers=["fe80::1%eth0"]))
    assert got.dns == []
    assert any("no IPv4 DNS server" in n for n in got.notes)


def test_no_default_route_is_local_mode() -> None:
    """Without a default route and without -a/-g: passt's local mode (169.254.2.1/16 via 169.254.2.2), -n
    still applies; with only one of -a and -g the other is required, and the message says which."""
    got = resolve(netinfo(route=None, route6=None))
    assert (got.address, got.prefix_len, got.gateway, got.interface) == ("169.254.2.1", 16, "169.254.2.2", None)
    assert (got.ipv4, got.ipv6, got.address6) == (True, True, None)
    assert any("local mode" in note for note in got.notes)
    assert resolve(netinfo(route=None), prefix_len="24").prefix_len == 24
    with pytest.raises(ConfigError, match=r"give a gateway \(-g\)$"):
        resolve(netinfo(route=None), address="10.0.0.2")
    got = resolve(netinfo(route=None), address="10.0.0.2", prefix_len="24", gateway="10.0.0.1")
    assert (got.address, got.prefix_len, got.gateway, got.interface) == ("10.0.0.2", 24, "10.0.0.1", None)


def test_interface_without_address_or_route() -> None:
    """-i naming an interface with no address / no default route explains it."""
    bare = HostNet(ifname="v1")
    with pytest.raises(ConfigError, match="host interface v1 has no IPv4 address"):
        resolve(netinfo(route=bare), interface="v1")
    no_gw = HostNet(ifname="v1", address="10.5.0.2", prefix_len=24)
    with pytest.raises(ConfigError, match="no IPv4 default route via interface v1"):
        resolve(netinfo(route=no_gw), interface="v1")
    assert resolve(netinfo(route=no_gw), interface="v1", gateway="10.5.0.1").interface == "v1"


def test_inconsistent_addressing() -> None:
    """Address equal to gateway, or a network/broadcast address, are refused."""
    with pytest.raises(ConfigError, match="address and gateway are both 10.99.0.1"):
        resolve(netinfo(), address="10.99.0.1", prefix_len="24")
    with pytest.raises(ConfigError, match="network or broadcast address of 10.99.0.0/24"):
        resolve(netinfo(), address="10.99.0.255", prefix_len="24")
    assert resolve(netinfo(), address="10.99.0.255", prefix_len="31", gateway="10.99.0.254").prefix_len == 31


def test_host_addressing_reads_resolv_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """host_addressing glues read_netinfo and resolve_addressing; netlink errors become ConfigError."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.77\nsearch a.example\n")
    monkeypatch.setattr(hostnet, "host_default_routes", lambda ifname, ifname6: (HOST, None))
    got = guest_addressing.host_addressing(load_config({}), str(resolv))
    assert (got.address, got.dns, got.search) == ("10.99.0.2", ["192.0.2.77"], ["a.example"])

    def broken(ifname: str | None, ifname6: str | None) -> tuple[HostNet | None, HostNet | None]:
        """Stand-in for a failing netlink read."""
        raise hostnet.HostNetError("there is no network interface named 'x'")

    monkeypatch.setattr(hostnet, "host_default_routes", broken)
    with pytest.raises(ConfigError, match="no network interface named 'x'"):
        guest_addressing.host_addressing(load_config({"interface": "x"}), str(resolv))


# ------------------------------------------------------------------ guest_params


def test_guest_params() -> None:
    """guest_params builds the net layer's GuestParams from Config + GuestAddressing."""
    from shardswitch.net.params import GuestParams

    cfg = load_config({"mtu": 9000, "mac": "02:11:22:33:44:55"})
    params = guest_addressing.guest_params(cfg, resolve_addressing(cfg, netinfo()))
    assert params == GuestParams(address="10.99.0.2", prefix_len=24, gateway="10.99.0.1", mtu=9000,
                                 dns=["192.0.2.53"], search=["corp.example"],
                                 our_mac="02:11:22:33:44:55", address6="2001:db8:99::2", gateway6="fe80::1")


def test_guest_params_rejected_by_net_layer() -> None:
    """What the network layer refuses (prefix length 0) surfaces as a ConfigError."""
    cfg = load_config({"prefix_len": "0", "address": "10.0.0.2", "gateway": "10.0.0.1"})
    with pytest.raises(ConfigError, match="guest parameters: prefix length 0"):
        guest_addressing.guest_params(cfg, resolve_addressing(cfg, netinfo()))


def test_dns_host_makes_the_gateway_the_resolver() -> None:
    """--dns-host alone: the gateway is offered and forwards there; with --dns-forward it is where that goes
    (else the host's resolv.conf is)."""
    got = resolve(netinfo(), dns_host="192.0.2.99")
    assert (got.dns, got.dns6, got.dns_forward) == (["10.99.0.1"], ["fe80::1"],
                                                    {"10.99.0.1": "192.0.2.99", "fe80::1": "192.0.2.99"})
    got = resolve(netinfo(), dns_host="127.0.0.53", dns_forward="10.99.0.53")
    assert (got.dns, got.dns_forward) == (["10.99.0.53"], {"10.99.0.53": "127.0.0.53"})
    got = resolve(netinfo(), dns_forward=["10.99.0.53", "fd00::53"])
    assert (got.dns6, got.dns_forward) == (["fd00::53"], {"10.99.0.53": "192.0.2.53", "fd00::53": "192.0.2.53"})


def test_dns_forward_goes_to_the_resolver_of_its_family() -> None:
    """--dns-forward: to the first resolv.conf server of its family, else the first at all; scoped and
    malformed entries are skipped."""
    got = resolve(netinfo(nameservers=["::1", "127.0.0.53", "192.0.2.1"]), dns_forward=["10.99.0.53", "fd00::53"])
    assert got.dns_forward == {"10.99.0.53": "127.0.0.53", "fd00::53": "::1"}
    got = resolve(netinfo(nameservers=["fe80::1%eth0", "::1"]), dns_forward="10.99.0.53")
    assert got.dns_forward == {"10.99.0.53": "::1"}
    got = resolve(netinfo(nameservers=[]), dns_forward="10.99.0.53")
    assert got.dns_forward == {}


def test_a_resolver_that_is_the_gateway_is_forwarded_to_itself() -> None:
    """A home router is often the gateway and the resolver: its port 53 goes to it, not to the host's
    loopback (where the gateway leads otherwise), even beside an explicit IPv6 forward."""
    got = resolve(netinfo(nameservers=["10.99.0.1"]))
    assert (got.dns, got.dns_forward) == (["10.99.0.1"], {"10.99.0.1": "10.99.0.1"})
    got = resolve(netinfo(nameservers=["10.99.0.1", "2001:db8::53"]), dns_forward=["fd00::53"])
    assert got.dns_forward == {"10.99.0.1": "10.99.0.1", "fd00::53": "2001:db8::53"}


def test_outbound_interfaces_choose_what_is_mirrored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--outbound-if4/6 name the interface each family is mirrored from (unless -i names one for both), as
    passt's."""
    asked: list[tuple[str | None, str | None]] = []

    def routes(ifname: str | None, ifname6: str | None) -> tuple[HostNet | None, HostNet | None]:
        """Record which interfaces were asked for."""
        asked.append((ifname, ifname6))
        return HOST, None

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.77\n")
    monkeypatch.setattr(hostnet, "host_default_routes", routes)
    guest_addressing.host_addressing(load_config({"outbound_if4": "v4", "outbound_if6": "v6"}), str(resolv))
    guest_addressing.host_addressing(load_config({"interface": "i", "outbound_if6": "v6"}), str(resolv))
    guest_addressing.host_addressing(load_config({"outbound_if4": "v4"}), str(resolv))
    assert asked == [("v4", "v6"), ("i", "i"), ("v4", None)]


def test_dns_host_once_per_family() -> None:
    """--dns-host once per family: each gateway's queries go to the resolver of its own family."""
    got = resolve(netinfo(nameservers=[]), dns_host=["127.0.0.53", "::1"])
    assert got.dns_forward == {"10.99.0.1": "127.0.0.53", "fe80::1": "::1"}


def test_guest_params_offer_what_the_options_say() -> None:
    """--no-dhcp-dns / --no-dhcp-search empty what DHCP, DHCPv6 and NDP offer (forwarding stays); -m 0 offers
    no MTU and sizes frames for the largest; -H and --fqdn reach the parameters."""
    cfg = load_config({"no_dhcp_dns": True, "no_dhcp_search": True, "mtu": 0, "hostname": "vm1",
                       "fqdn": "vm1.example.org"})
    addressing = resolve(netinfo(nameservers=["127.0.0.53"], search=["a.example"]))
    params = guest_addressing.guest_params(cfg, addressing)
    assert (params.dns, params.dns6, params.search) == ([], [], [])
    assert addressing.dns_forward
    assert (params.offer_mtu, params.mtu, params.hostname, params.fqdn) == (False, 65520, "vm1", "vm1.example.org")
