"""Tests of shardswitch.config (loading, validation, addressing) and shardswitch.hostnet.

The netlink part of hostnet runs inside a network namespace created by the
test (needs root and iproute2; skipped otherwise) and deleted afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shardswitch import config, hostnet
from shardswitch.config import Addressing, Config, ConfigError, load_config, resolve_addressing
from shardswitch.hostnet import AddrEntry, HostNet, NetInfo, RouteEntry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make the default socket path predictable: $XDG_RUNTIME_DIR under tmp_path."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))


def write_toml(tmp_path: Path, text: str, name: str = "ss.toml") -> str:
    """Write a TOML file and return its path."""
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(values: dict[str, Any]) -> str:
    """Return the ConfigError message load_config raises for ``values``."""
    with pytest.raises(ConfigError) as info:
        load_config(values)
    return str(info.value)


# ------------------------------------------------------------------ default paths


def test_default_socket_path_prefers_xdg_runtime_dir() -> None:
    """XDG_RUNTIME_DIR wins, for root too."""
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert config.default_socket_path(env, 1000) == "/run/user/1000/shardswitch/shardswitch.sock"
    assert config.default_socket_path(env, 0) == "/run/user/1000/shardswitch/shardswitch.sock"


def test_default_socket_path_root_and_fallback() -> None:
    """Root without XDG uses /run; others /tmp/shardswitch-UID; a relative XDG dir is ignored."""
    assert config.default_socket_path({}, 0) == "/run/shardswitch/shardswitch.sock"
    assert config.default_socket_path({}, 1234) == "/tmp/shardswitch-1234/shardswitch.sock"
    assert config.default_socket_path({"XDG_RUNTIME_DIR": "rel"}, 5) == "/tmp/shardswitch-5/shardswitch.sock"


def test_default_control_path(tmp_path: Path) -> None:
    """The control socket is the vhost-user socket plus .ctl, default socket when None."""
    assert config.default_control_path("/x/s.sock") == "/x/s.sock.ctl"
    assert config.default_control_path() == str(tmp_path / "run/shardswitch/shardswitch.sock.ctl")


# ------------------------------------------------------------------ parse_prefix


@pytest.mark.parametrize("text,length", [("24", 24), ("0", 0), ("32", 32), (" 8 ", 8),
                                         ("255.255.255.0", 24), ("255.255.255.255", 32),
                                         ("0.0.0.0", 0), ("255.255.240.0", 20)])
def test_parse_prefix_accepts_lengths_and_netmasks(text: str, length: int) -> None:
    """Prefix lengths and contiguous netmasks both give the length."""
    assert config.parse_prefix(text) == length


@pytest.mark.parametrize("text", ["33", "-1", "255.0.255.0", "0.0.0.255", "abc", "", "1.2.3"])
def test_parse_prefix_rejects(text: str) -> None:
    """Out-of-range lengths, holes in the mask, host masks and junk are refused."""
    with pytest.raises(ValueError, match="not a prefix length"):
        config.parse_prefix(text)


# ------------------------------------------------------------------ load_config


def test_defaults(tmp_path: Path) -> None:
    """No options: every default, socket and control under XDG_RUNTIME_DIR."""
    cfg = load_config({})
    sock = str(tmp_path / "run/shardswitch/shardswitch.sock")
    assert cfg == Config(socket=sock, control=sock + ".ctl")
    assert (cfg.workers, cfg.mtu, cfg.mac) == (1, 65520, "9a:55:9a:55:9a:55")
    assert cfg.connect is None and cfg.dns is None and cfg.search is None


def test_file_then_command_line(tmp_path: Path) -> None:
    """The command line overrides the file key by key; file-only keys stay."""
    path = write_toml(tmp_path, 'workers = 4\nmtu = 1500\nprefix_len = "255.255.0.0"\n'
                               'dns = ["192.0.2.53"]\nsearch = ["example.org"]\nmac = "02:AA:bb:cc:dd:ee"\n')
    cfg = load_config({"config": path, "workers": 2, "dns": ["198.51.100.1"]})
    assert cfg.workers == 2
    assert cfg.mtu == 1500
    assert cfg.prefix_len == 16
    assert cfg.dns == ["198.51.100.1"]
    assert cfg.search == ["example.org"]
    assert cfg.mac == "02:aa:bb:cc:dd:ee"


def test_command_line_connect_overrides_file_socket(tmp_path: Path) -> None:
    """--connect drops the file's socket (and debug/quiet likewise); control gets the default."""
    path = write_toml(tmp_path, 'socket = "/tmp/a.sock"\ndebug = true\n')
    cfg = load_config({"config": path, "connect": "/tmp/qemu.sock", "quiet": True})
    assert cfg.socket is None and cfg.connect == "/tmp/qemu.sock"
    assert cfg.control == str(tmp_path / "run/shardswitch/shardswitch.sock.ctl")
    assert (cfg.debug, cfg.quiet) == (False, True)


def test_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File paths are relative to the file's directory, command-line ones to the cwd."""
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write_toml(sub, 'socket = "s.sock"\n')
    assert load_config({"config": path}).socket == str(sub / "s.sock")
    monkeypatch.chdir(tmp_path)
    cfg = load_config({"socket": "x.sock", "control": "c/x.ctl"})
    assert (cfg.socket, cfg.control) == (str(tmp_path / "x.sock"), str(tmp_path / "c/x.ctl"))


def test_namespace_extra_attributes_are_ignored() -> None:
    """argparse Namespaces carry the sub-command etc.: only fields and config are used."""
    import argparse

    args = argparse.Namespace(command="start", func=None, workers=3, mtu=None, json=False)
    assert load_config(args).workers == 3


def test_file_error_names_file_key_and_value(tmp_path: Path) -> None:
    """The brief's example message, exactly."""
    path = write_toml(tmp_path, "workers = 0\n")
    assert error_of({"config": path}) == f"config file {path}: workers: Expected `int` >= 1, got 0"


@pytest.mark.parametrize("values,message", [
    ({"workers": 17}, "command line: --workers: Expected `int` <= 16, got 17"),
    ({"mtu": 67}, "command line: -m/--mtu: Expected `int` >= 68, got 67"),
    ({"mtu": 65521}, "command line: -m/--mtu: Expected `int` <= 65520, got 65521"),
    ({"prefix_len": "33"}, "command line: -n/--netmask: '33' is not a prefix length"),
    ({"mac": "9a:55:9a:55:9a"}, "command line: -M/--mac-addr: Expected a MAC address"),
    ({"mac": "01:00:5e:00:00:01"}, "is a multicast MAC address"),
    ({"mac": "00:00:00:00:00:00"}, "is the all-zero MAC address"),
    ({"address": "10.0.0"}, "command line: -a/--address: '10.0.0' is not an IPv4 address"),
    ({"address": "224.0.0.1"}, "-a/--address: 224.0.0.1 is not a unicast address"),
    ({"gateway": "127.0.0.1"}, "-g/--gateway: 127.0.0.1 is a loopback address"),
    ({"gateway": "0.0.0.0"}, "-g/--gateway: 0.0.0.0 is not a unicast address"),
    ({"dns": ["192.0.2.1", "::1"]}, "--dns: '::1' is not an IPv4 address"),
    ({"interface": "a-very-long-ifname"}, "-i/--interface: Expected `str` of length <= 15"),
    ({"interface": "eth 0"}, "-i/--interface: Expected an interface name"),
    ({"search": ["ok.example", "bad domain"]}, "--search: Expected a domain name like example.org, got 'bad domain'"),
    ({"socket": "/" + "x" * 110}, "--socket: /xxx"),
    ({"socket": "/tmp/s", "control": "/tmp/s"}, "--control: must differ from the vhost-user socket"),
    ({"socket": "/tmp/s", "connect": "/tmp/c"}, "--socket and --connect exclude each other"),
    ({"debug": True, "quiet": True}, "-d/--debug and -q/--quiet exclude each other"),
    ({"bogus": 1}, "command line: Object contains unknown field `bogus`"),
    ({"workers": "2"}, "command line: --workers: Expected `int`, got `str`"),
])
def test_command_line_errors(values: dict[str, Any], message: str) -> None:
    """Each bad option gives a ConfigError naming the option and the problem."""
    assert message in error_of(values)


@pytest.mark.parametrize("text,message", [
    ("wrkers = 2\n", "Object contains unknown field `wrkers`"),
    ('dns = ["192.0.2.1", "x"]\n', ": dns[1]: 'x' is not an IPv4 address"),
    ('search = ["a", 5]\n', ": search[1]: Expected `str`, got `int`"),
    ('prefix_len = "255.0.255.0"\n', ": prefix_len: '255.0.255.0' is not a prefix length"),
    ('socket = "/a"\nconnect = "/b"\n', ": socket and connect exclude each other"),
    ("workers = \n", "Invalid value (at line 1, column 11)"),
    ("reflect = 1\n", ": reflect: Expected `bool`, got `int`"),
])
def test_file_errors(tmp_path: Path, text: str, message: str) -> None:
    """Errors in the file name the file and the TOML key (with list index)."""
    path = write_toml(tmp_path, text)
    error = error_of({"config": path})
    assert error.startswith(f"config file {path}: ")
    assert message in error


def test_missing_and_unreadable_file(tmp_path: Path) -> None:
    """A missing file and a non-UTF-8 file are ConfigErrors, not tracebacks."""
    missing = str(tmp_path / "nope.toml")
    assert error_of({"config": missing}) == f"config file {missing}: No such file or directory"
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'a = "\xff"\n')
    assert error_of({"config": str(bad)}).startswith(f"config file {bad}: ")


def test_too_long_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A default path that cannot be a unix socket address is reported too."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/" + "r" * 100)
    assert "default paths: socket: " in error_of({})


# ------------------------------------------------------------------ resolve_addressing

HOST = HostNet(ifname="eth0", address="10.99.0.2", prefix_len=24, gateway="10.99.0.1")


def netinfo(route: HostNet | None = HOST, nameservers: list[str] | None = None,
            search: list[str] | None = None) -> NetInfo:
    """Build a host snapshot for resolve_addressing."""
    return NetInfo(route=route, nameservers=["192.0.2.53"] if nameservers is None else nameservers,
                   search=["corp.example"] if search is None else search)


def resolve(info: NetInfo, **options: Any) -> Addressing:
    """Load options and resolve them against ``info``."""
    return resolve_addressing(load_config(options), info)


def test_mirrors_the_host() -> None:
    """By default the guest gets the host's address, prefix, gateway, DNS and search list."""
    got = resolve(netinfo())
    assert got == Addressing(address="10.99.0.2", prefix_len=24, gateway="10.99.0.1", mtu=65520,
                             dns=["192.0.2.53"], search=["corp.example"], mac="9a:55:9a:55:9a:55",
                             interface="eth0", notes=[])


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


def test_dns_keeps_non_loopback_ipv4_only() -> None:
    """IPv6 and loopback resolvers are dropped when a usable IPv4 one exists."""
    got = resolve(netinfo(nameservers=["127.0.0.53", "2001:db8::1", "192.0.2.9", "192.0.2.10"]))
    assert got.dns == ["192.0.2.9", "192.0.2.10"]


def test_loopback_only_resolvers_give_the_gateway() -> None:
    """systemd-resolved style hosts: the gateway is offered, with a note."""
    got = resolve(netinfo(nameservers=["127.0.0.53", "::1"]))
    assert got.dns == ["10.99.0.1"]
    assert any("loopback only (127.0.0.53)" in n for n in got.notes)


def test_no_resolvers() -> None:
    """No usable DNS server: none offered, with a note."""
    got = resolve(netinfo(nameservers=["fe80::1%eth0"]))
    assert got.dns == []
    assert any("no IPv4 DNS server" in n for n in got.notes)


def test_no_default_route_needs_address_and_gateway() -> None:
    """Without a default route, -a and -g are both required; the message says which is missing."""
    with pytest.raises(ConfigError, match=r"no IPv4 default route; give an address \(-a\) "
                                          r"and a gateway \(-g\)"):
        resolve(netinfo(route=None))
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
    monkeypatch.setattr(hostnet, "host_default_route", lambda ifname: HOST)
    got = config.host_addressing(load_config({}), str(resolv))
    assert (got.address, got.dns, got.search) == ("10.99.0.2", ["192.0.2.77"], ["a.example"])

    def broken(ifname: str | None) -> HostNet | None:
        """Stand-in for a failing netlink read."""
        raise hostnet.HostNetError("there is no network interface named 'x'")

    monkeypatch.setattr(hostnet, "host_default_route", broken)
    with pytest.raises(ConfigError, match="no network interface named 'x'"):
        config.host_addressing(load_config({"interface": "x"}), str(resolv))


# ------------------------------------------------------------------ guest_params


def test_guest_params() -> None:
    """guest_params builds the net layer's GuestParams from Config + Addressing."""
    from shardswitch.net.params import GuestParams

    cfg = load_config({"mtu": 9000, "mac": "02:11:22:33:44:55"})
    params = config.guest_params(cfg, resolve_addressing(cfg, netinfo()))
    assert params == GuestParams(address="10.99.0.2", prefix_len=24, gateway="10.99.0.1", mtu=9000,
                                 dns=["192.0.2.53"], search=["corp.example"],
                                 our_mac="02:11:22:33:44:55")


def test_guest_params_rejected_by_net_layer() -> None:
    """What the network layer refuses (prefix length 0) surfaces as a ConfigError."""
    cfg = load_config({"prefix_len": "0", "address": "10.0.0.2", "gateway": "10.0.0.1"})
    with pytest.raises(ConfigError, match="guest parameters: prefix length 0"):
        config.guest_params(cfg, resolve_addressing(cfg, netinfo()))


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


# ------------------------------------------------------------------ hostnet: netlink in a namespace


def _ip(*args: str) -> None:
    """Run an iproute2 command, failing the test on error."""
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def cfg_netns() -> Iterator[str]:
    """A network namespace with a veth pair: v0 10.99.0.2/24 + default via 10.99.0.1, v1 bare."""
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
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def host_default_route_in(ns: str, ifname: str | None) -> Any:
    """Run hostnet.host_default_route(ifname) inside namespace ``ns``; return the decoded result."""
    code = ("import sys, msgspec\n"
            "from shardswitch import hostnet\n"
            "try:\n"
            f"    out = hostnet.host_default_route({ifname!r})\n"
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


def test_no_default_route_in_namespace(cfg_netns: str) -> None:
    """Without a default route: None (then resolve_addressing asks for -a/-g)."""
    _ip("-n", cfg_netns, "route", "del", "default")
    try:
        assert host_default_route_in(cfg_netns, None) is None
    finally:
        _ip("-n", cfg_netns, "route", "add", "default", "via", "10.99.0.1", "dev", "v0")


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-flows", "3"], "--max-flows: Expected `int` >= 16"),
    (["--max-flows", "2000000"], "--max-flows: Expected `int` <= 1048575"),
    (["--map-host-loopback", "127.0.0.1"], "--map-host-loopback: 127.0.0.1 is a loopback address"),
    (["--map-host-loopback", "gateway"], "--map-host-loopback: 'gateway' is not an IP address"),
    (["--dns-forward", "224.0.0.1"], "--dns-forward: 224.0.0.1 is not a unicast"),
    (["-t", "80-70"], "-t/--tcp-ports"),
    (["-u", "99999"], "-u/--udp-ports"),
])
def test_flow_and_forwarding_options_refuse_bad_values(argv: list[str], message: str) -> None:
    """The options of the flow table, loopback mapping, forwarding and DNS name the option and the problem."""
    from shardswitch.cli import build_parser

    with pytest.raises(ConfigError, match="^command line: " + re.escape(message)):
        load_config(build_parser().parse_args(["start", *argv]))


def test_map_host_loopback_and_no_map_gw_exclude_each_other() -> None:
    """argparse refuses both at once (exit status 2, a usage message)."""
    from shardswitch.cli import main

    assert main(["start", "--map-host-loopback", "10.0.2.9", "--no-map-gw"]) == 2
