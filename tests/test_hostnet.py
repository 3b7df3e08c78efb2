"""Tests of shardswitch.hostnet: resolv.conf, route and address selection, and netlink in a test namespace.

The netlink part runs inside a network namespace created by the test (needs
root and iproute2; skipped otherwise) and deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shardswitch import hostnet
from shardswitch.hostnet import AddrEntry, HostNet, RouteEntry

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ hostnet: pure parts


def test_parse_resolv_conf() -> None:
    """Nameservers in order without duplicates, bad ones skipped; the last search/domain line wins."""
    text = """# generated
; comment
nameserver 192.0.2.1
nameserver   2001:db8::53
nameserver fe80::1%eth0
nameserver not-an-ip
nameserver 192.0.2.1
nameserver
search old.example
options ndots:2
search corp.example. lab.example # trailing comment
"""
    assert hostnet.parse_resolv_conf(text) == (["192.0.2.1", "2001:db8::53", "fe80::1%eth0"],
                                               ["corp.example", "lab.example"])
    assert hostnet.parse_resolv_conf("search a.example\ndomain b.example\n") == ([], ["b.example"])
    assert hostnet.parse_resolv_conf("") == ([], [])


def test_read_resolv_conf_missing_file(tmp_path: Path) -> None:
    """No resolv.conf means no servers and no search list."""
    assert hostnet.read_resolv_conf(str(tmp_path / "none")) == ([], [])


LINKS = {1: "lo", 2: "eth0", 3: "eth1", 4: "wg0"}
ADDRS = [AddrEntry(1, "127.0.0.1", 8, False),
         AddrEntry(2, "192.0.2.10", 24, False), AddrEntry(2, "192.0.2.11", 24, True),
         AddrEntry(3, "198.51.100.5", 24, False), AddrEntry(3, "203.0.113.5", 24, False)]


def test_select_lowest_metric_default_route() -> None:
    """The default route with the lowest metric decides the interface."""
    routes = [RouteEntry(2, "192.0.2.1", 600), RouteEntry(3, "203.0.113.1", 100)]
    got = hostnet.select_host_net(routes, ADDRS, LINKS, None)
    # eth1's primary address on the gateway's network is preferred over its first one
    assert got == HostNet(ifname="eth1", address="203.0.113.5", prefix_len=24, gateway="203.0.113.1")


def test_select_skips_secondary_addresses_and_unknown_links() -> None:
    """Secondary addresses are never mirrored; routes via vanished links are skipped."""
    routes = [RouteEntry(9, "10.0.0.1", 0), RouteEntry(2, "192.0.2.1", 5)]
    got = hostnet.select_host_net(routes, ADDRS, LINKS, None)
    assert got == HostNet(ifname="eth0", address="192.0.2.10", prefix_len=24, gateway="192.0.2.1")


def test_select_no_default_route() -> None:
    """No default route and no interface named: None."""
    assert hostnet.select_host_net([], ADDRS, LINKS, None) is None


def test_select_named_interface() -> None:
    """-i: that interface, the gateway of a default route via it if any, else none."""
    routes = [RouteEntry(2, "192.0.2.1", 0)]
    assert hostnet.select_host_net(routes, ADDRS, LINKS, "eth1") == HostNet(
        ifname="eth1", address="198.51.100.5", prefix_len=24, gateway=None)
    assert hostnet.select_host_net(routes, ADDRS, LINKS, "wg0") == HostNet(ifname="wg0")
    with pytest.raises(hostnet.HostNetError, match="no network interface named 'nope'"):
        hostnet.select_host_net(routes, ADDRS, LINKS, "nope")


def test_route_and_address_messages_are_reduced() -> None:
    """Netlink messages (dicts here) -> records: only main-table unicast defaults; multipath per hop."""
    messages = [
        {"dst_len": 0, "type": 1, "table": 254, "priority": 10, "oif": 2, "gateway": "192.0.2.1"},
        {"dst_len": 24, "type": 1, "table": 254, "oif": 2},
        {"dst_len": 0, "type": 1, "table": 100, "oif": 3, "gateway": "198.51.100.1"},
        {"dst_len": 0, "type": 7, "table": 254},
        {"dst_len": 0, "type": 1, "table": 254, "multipath": [
            {"oif": 3, "gateway": "198.51.100.1"}, {"oif": 4, "gateway": "203.0.113.1"}]},
    ]
    routes = hostnet._route_entries(messages)
    assert routes == [RouteEntry(2, "192.0.2.1", 10), RouteEntry(3, "198.51.100.1", 0),
                      RouteEntry(4, "203.0.113.1", 0)]
    assert hostnet.select_host_net(routes, ADDRS, LINKS, None) == HostNet(
        ifname="eth1", address="198.51.100.5", prefix_len=24, gateway="198.51.100.1")
    assert hostnet.select_host_net(routes, ADDRS, LINKS, "wg0") == HostNet(ifname="wg0",
                                                                           gateway="203.0.113.1")
    addrs = hostnet._addr_entries([{"index": 2, "prefixlen": 24, "flags": 0x81, "local": "192.0.2.11"},
                                   {"index": 2, "prefixlen": 8, "flags": 0x80, "address": "10.0.0.1"},
                                   {"index": 2, "prefixlen": 8, "flags": 0}])
    assert addrs == [AddrEntry(2, "192.0.2.11", 24, True), AddrEntry(2, "10.0.0.1", 8, False)]


def test_ipv6_addresses_and_link_local_gateway() -> None:
    """IPv6: global-scope addresses only, none temporary/deprecated/DAD-failed; a link-local gateway
    contains no address, so the first global one is mirrored."""
    messages = [{"index": 2, "prefixlen": 64, "flags": 0x80, "scope": 253, "address": "fe80::2"},
                {"index": 2, "prefixlen": 64, "flags": 0x01, "scope": 0, "address": "2001:db8::aaaa"},
                {"index": 2, "prefixlen": 64, "flags": 0x20, "scope": 0, "address": "2001:db8::dead"},
                {"index": 2, "prefixlen": 64, "flags": 0x08, "scope": 0, "address": "2001:db8::bad"},
                {"index": 2, "prefixlen": 64, "flags": 0x80, "scope": 0, "address": "2001:db8::2"},
                {"index": 1, "prefixlen": 128, "flags": 0x80, "scope": 254, "address": "::1"}]
    addrs = hostnet._addr_entries(messages, socket.AF_INET6)
    assert addrs == [AddrEntry(2, "2001:db8::2", 64, False)]
    routes = hostnet._route_entries([{"dst_len": 0, "type": 1, "table": 254, "priority": 1024, "oif": 2,
                                      "gateway": "fe80::1"}])
    assert hostnet.select_host_net(routes, addrs, LINKS, None) == HostNet(
        ifname="eth0", address="2001:db8::2", prefix_len=64, gateway="fe80::1")
    on_net = [AddrEntry(2, "2001:db8:1::2", 64, False), AddrEntry(2, "2001:db8:2::2", 64, False)]
    assert hostnet.select_host_net([RouteEntry(2, "2001:db8:2::1", 0)], on_net, LINKS, None).address == \
        "2001:db8:2::2"


# ------------------------------------------------------------------ hostnet: netlink in a namespace


def _ip(*args: str) -> None:
    """Run an iproute2 command, failing the test on error."""
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def cfg_netns() -> Iterator[str]:
    """A network namespace with a veth pair: v0 10.99.0.2/24 + default via 10.99.0.1 and
    2001:db8:99::2/64 + default via fe80::1 (and a deprecated address), v1 bare."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"ss-cfgtest-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        for dev in ("lo", "v0", "v1"):
            _ip("-n", name, "link", "set", dev, "up")
        _ip("-n", name, "addr", "add", "10.99.0.2/24", "dev", "v0")
        _ip("-n", name, "addr", "add", "10.99.0.3/24", "dev", "v0")  # becomes secondary
        _ip("-n", name, "route", "add", "default", "via", "10.99.0.1", "dev", "v0")
        _ip("-n", name, "addr", "add", "2001:db8:99::9/64", "dev", "v0", "nodad", "preferred_lft", "0")
        _ip("-n", name, "addr", "add", "2001:db8:99::2/64", "dev", "v0", "nodad")
        _ip("-n", name, "-6", "route", "add", "default", "via", "fe80::1", "dev", "v0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def host_default_route_in(ns: str, ifname: str | None, family: int = 4) -> Any:
    """Run hostnet.host_default_routes(ifname, ifname) (-i: both families) inside namespace ``ns``; return the
    decoded result of ``family`` (4 or 6)."""
    code = ("import sys, msgspec\n"
            "from shardswitch import hostnet\n"
            "try:\n"
            f"    out = hostnet.host_default_routes({ifname!r}, {ifname!r})[{0 if family == 4 else 1}]\n"
            "except hostnet.HostNetError as e:\n"
            "    out = {'error': str(e)}\n"
            "sys.stdout.buffer.write(msgspec.json.encode(out))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], env=env,
                         capture_output=True, timeout=60, check=True)
    return msgspec.json.decode(run.stdout)


def test_host_default_route_in_namespace(cfg_netns: str) -> None:
    """Netlink read of the default-route interface, a named bare interface, and a missing one."""
    got = host_default_route_in(cfg_netns, None)
    assert msgspec.convert(got, HostNet) == HostNet(ifname="v0", address="10.99.0.2", prefix_len=24,
                                                    gateway="10.99.0.1")
    assert msgspec.convert(host_default_route_in(cfg_netns, "v1"), HostNet) == HostNet(ifname="v1")
    assert host_default_route_in(cfg_netns, "nope") == {"error": "there is no network interface named 'nope'"}


def test_host_default_route6_in_namespace(cfg_netns: str) -> None:
    """The IPv6 default route via a link-local router, the global address (the deprecated one skipped)."""
    got = host_default_route_in(cfg_netns, None, 6)
    assert msgspec.convert(got, HostNet) == HostNet(ifname="v0", address="2001:db8:99::2", prefix_len=64,
                                                    gateway="fe80::1")
    assert msgspec.convert(host_default_route_in(cfg_netns, "v1", 6), HostNet) == HostNet(ifname="v1")


def test_no_default_route_in_namespace(cfg_netns: str) -> None:
    """Without a default route: None (then resolve_addressing asks for -a/-g)."""
    _ip("-n", cfg_netns, "route", "del", "default")
    try:
        assert host_default_route_in(cfg_netns, None) is None
    finally:
        _ip("-n", cfg_netns, "route", "add", "default", "via", "10.99.0.1", "dev", "v0")
