"""Tests of shardswitch.settings: default paths, prefix parsing, loading and validation of every layer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from shardswitch import settings
from shardswitch.settings import Config, ConfigError, load_config

pytestmark = pytest.mark.usefixtures("runtime_dir")


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
    assert settings.default_socket_path(env, 1000) == "/run/user/1000/shardswitch/shardswitch.sock"
    assert settings.default_socket_path(env, 0) == "/run/user/1000/shardswitch/shardswitch.sock"


def test_default_socket_path_root_and_fallback() -> None:
    """Root without XDG uses /run; others /tmp/shardswitch-UID; a relative XDG dir is ignored."""
    assert settings.default_socket_path({}, 0) == "/run/shardswitch/shardswitch.sock"
    assert settings.default_socket_path({}, 1234) == "/tmp/shardswitch-1234/shardswitch.sock"
    assert settings.default_socket_path({"XDG_RUNTIME_DIR": "rel"}, 5) == "/tmp/shardswitch-5/shardswitch.sock"


def test_default_control_path(tmp_path: Path) -> None:
    """The control socket is the vhost-user socket plus .ctl, default socket when None."""
    assert settings.default_control_path("/x/s.sock") == "/x/s.sock.ctl"
    assert settings.default_control_path() == str(tmp_path / "run/shardswitch/shardswitch.sock.ctl")


# ------------------------------------------------------------------ parse_prefix


@pytest.mark.parametrize("text,length", [("24", 24), ("0", 0), ("32", 32), (" 8 ", 8),
                                         ("255.255.255.0", 24), ("255.255.255.255", 32),
                                         ("0.0.0.0", 0), ("255.255.240.0", 20)])
def test_parse_prefix_accepts_lengths_and_netmasks(text: str, length: int) -> None:
    """Prefix lengths and contiguous netmasks both give the length."""
    assert settings.parse_prefix(text) == length


@pytest.mark.parametrize("text", ["33", "-1", "255.0.255.0", "0.0.0.255", "abc", "", "1.2.3"])
def test_parse_prefix_rejects(text: str) -> None:
    """Out-of-range lengths, holes in the mask, host masks and junk are refused."""
    with pytest.raises(ValueError, match="not a prefix length"):
        settings.parse_prefix(text)


# ------------------------------------------------------------------ load_config


def test_defaults(tmp_path: Path) -> None:
    """No options: every default, socket and control under XDG_RUNTIME_DIR."""
    cfg = load_config({})
    sock = str(tmp_path / "run/shardswitch/shardswitch.sock")
    assert cfg == Config(socket=sock, control=sock + ".ctl", repair_path=sock + ".repair")
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
    ({"mtu": 67}, "command line: -m/--mtu: 67 is below 68 (0: offer no MTU)"),
    ({"mtu": 65521}, "command line: -m/--mtu: Expected `int` <= 65520, got 65521"),
    ({"prefix_len": "129"}, "command line: -n/--netmask or -a ADDR/LEN: Expected `int` <= 128"),
    ({"mac": "9a:55:9a:55:9a"}, "command line: -M/--mac-addr: Expected a MAC address"),
    ({"mac": "01:00:5e:00:00:01"}, "is a multicast MAC address"),
    ({"mac": "00:00:00:00:00:00"}, "is the all-zero MAC address"),
    ({"address": "10.0.0"}, "command line: -a/--address: '10.0.0' is not an IPv4 address"),
    ({"address": "224.0.0.1"}, "-a/--address: 224.0.0.1 is not a unicast address"),
    ({"gateway": "127.0.0.1"}, "-g/--gateway: 127.0.0.1 is a loopback address"),
    ({"gateway": "0.0.0.0"}, "-g/--gateway: 0.0.0.0 is not a unicast address"),
    ({"dns": ["192.0.2.1", "ff02::1"]}, "-D/--dns: ff02::1 is not a unicast address"),
    ({"address": ["10.0.0.2", "10.0.0.3"]}, "command line: -a/--address: given twice (10.0.0.2 and 10.0.0.3)"),
    ({"address": ["2001:db8::2", "2001:db8::3/64"]}, "-a/--address: given twice"),
    ({"address": ["2001:db8::2/x"]}, "-n/--netmask or -a ADDR/LEN: 'x' is not a prefix length"),
    ({"address": ["2001:db8::2/129"]}, "-n/--netmask or -a ADDR/LEN: Expected `int` <= 128"),
    ({"prefix_len": ["24", "16"]}, "-n/--netmask: given twice (24 and 16)"),
    ({"prefix_len": ["64"], "address": ["2001:db8::2/56"]}, "-n/--netmask or -a ADDR/LEN: given twice"),
    ({"address": ["2001:db8::zz"]}, "-a/--address: '2001:db8::zz' is not an IPv6 address"),
    ({"gateway": ["ff02::1"]}, "-g/--gateway: ff02::1 is not a unicast address"),
    ({"outbound": ["::1"]}, "-o/--outbound: ::1 is a loopback address"),
    ({"ipv4_only": True, "ipv6_only": True}, "-4/--ipv4-only and -6/--ipv6-only exclude each other"),
    ({"outbound_if4": "a/b"}, "--outbound-if4: Expected an interface name"),
    ({"map_guest_addr": "224.0.0.1"}, "--map-guest-addr: 224.0.0.1 is not a unicast address"),
    ({"interface": "a-very-long-ifname"}, "-i/--interface: Expected `str` of length <= 15"),
    ({"interface": "eth 0"}, "-i/--interface: Expected an interface name"),
    ({"search": ["ok.example", "bad..domain"]}, "-S/--search: Expected a domain name like example.org, got 'bad..domain'"),
    ({"socket": "/" + "x" * 110}, "--socket: /xxx"),
    ({"socket": "/tmp/s", "control": "/tmp/s"}, "--control: must differ from the vhost-user socket"),
    ({"socket": "/tmp/s", "connect": "/tmp/c"}, "--socket and --connect exclude each other"),
    ({"debug": True, "quiet": True}, "-d/--debug and -q/--quiet exclude each other"),
    ({"bogus": 1}, "command line: Object contains unknown field `bogus`"),
    ({"workers": "2"}, "command line: --workers: Expected `int`, got `str`"),
    ({"dns_host": "ff02::1"}, "command line: --dns-host: ff02::1 is not a unicast address"),
    ({"dns_host": "resolver"}, "command line: --dns-host: 'resolver' is not an IPv4 address"),
    ({"no_dhcp": "yes"}, "command line: --no-dhcp: Expected `bool`, got `str`"),
])
def test_command_line_errors(values: dict[str, Any], message: str) -> None:
    """Each bad option gives a ConfigError naming the option and the problem."""
    assert message in error_of(values)


@pytest.mark.parametrize("text,message", [
    ("wrkers = 2\n", "Object contains unknown field `wrkers`"),
    ('dns = ["192.0.2.1", "x"]\n', ": dns[1]: 'x' is not an IP address"),
    ('address6 = "10.0.0.1"\n', ": address6: '10.0.0.1' is not an IPv6 address"),
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


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-flows", "3"], "--max-flows: Expected `int` >= 16"),
    (["--max-flows", "2000000"], "--max-flows: Expected `int` <= 1048575"),
    (["--map-host-loopback", "127.0.0.1"], "--map-host-loopback: 127.0.0.1 is a loopback address"),
    (["--map-host-loopback", "gateway"], "--map-host-loopback: 'gateway' is not an IP address"),
    (["--dns-forward", "224.0.0.1"], "--dns-forward: 224.0.0.1 is not a unicast"),
    (["-t", "80-70"], "-t/--tcp-ports"),
    (["-u", "99999"], "-u/--udp-ports"),
    (["--fd", "2"], "-F/--fd: Expected `int` >= 3"),
    (["--fd", "3", "--connect", "/tmp/c"], "-F/--fd and --connect exclude each other"),
    (["--log-size", "1000"], "--log-size: Expected `int` >= 65536"),
    (["--pid", ""], "-P/--pid: Expected `str` of length >= 1"),
    (["--metrics", "9410"], "--metrics: '9410' is not ADDR:PORT"),
    (["--metrics", "localhost:9410"], "--metrics: 'localhost:9410': 'localhost' is not an IP address"),
    (["--metrics", "127.0.0.1:0"], "--metrics: '127.0.0.1:0' is not ADDR:PORT"),
    (["--pcap-size", "1000"], "--pcap-size: 1000 is below 1048576 bytes (0: no limit)"),
    (["--pcap-size=-1"], "--pcap-size: Expected `int` >= 0"),
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


def test_service_switches_and_dns_host(tmp_path: Path) -> None:
    """--no-dhcp/--no-ndp/--no-ra/--no-icmp and --dns-host (a loopback resolver is fine) from either layer."""
    from shardswitch.cli import build_parser

    argv = ["start", "--no-dhcp", "--no-ra", "--dns-host", "127.0.0.53"]
    cfg = load_config(build_parser().parse_args(argv))
    assert (cfg.no_dhcp, cfg.no_ndp, cfg.no_ra, cfg.no_icmp, cfg.dns_host) == (True, False, True, False, "127.0.0.53")
    path = write_toml(tmp_path, 'no_ndp = true\nno_icmp = true\ndns_host = "::1"\n')
    cfg = load_config({"config": path})
    assert (cfg.no_dhcp, cfg.no_ndp, cfg.no_icmp, cfg.dns_host, cfg.dns_host6) == (False, True, True, None, "::1")


def test_addresses_of_either_family_split_by_family(tmp_path: Path) -> None:
    """-a/-g/-o/--dns-forward take either family, once each; a file's IPv4 value survives a command-line
    IPv6 one; -a ADDR/LEN sets the IPv6 prefix length."""
    cfg = load_config({"address": ["10.0.0.2", "2001:db8::2/56"], "gateway": ["fe80::1", "10.0.0.1"],
                       "outbound": ["2001:db8::9"], "dns_forward": ["fd00::53", "10.0.0.53"],
                       "dns": ["192.0.2.1", "2001:db8::53"]})
    assert (cfg.address, cfg.address6, cfg.prefix6_len) == ("10.0.0.2", "2001:db8::2", 56)
    assert (cfg.gateway, cfg.gateway6, cfg.outbound, cfg.outbound6) == ("10.0.0.1", "fe80::1", None, "2001:db8::9")
    assert (cfg.dns_forward, cfg.dns_forward6, cfg.dns) == ("10.0.0.53", "fd00::53", ["192.0.2.1", "2001:db8::53"])
    cfg = load_config({"prefix_len": ["255.255.0.0", "56"]})
    assert (cfg.prefix_len, cfg.prefix6_len) == (16, 56)
    path = write_toml(tmp_path, 'address = "10.0.0.7"\ngateway = "2001:db8::1"\nprefix6_len = 48\n')
    cfg = load_config({"config": path, "address": ["2001:db8::7"]})
    assert (cfg.address, cfg.address6, cfg.prefix6_len, cfg.gateway6) == ("10.0.0.7", "2001:db8::7", 48,
                                                                          "2001:db8::1")


def test_hosting_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--fd, --pid, -l and --log-size land in the settings, file paths made absolute like the sockets';
    the TOML keys are fd, pid_file, log_file and log_size."""
    from shardswitch.cli import build_parser

    monkeypatch.chdir(tmp_path)
    cfg = load_config(build_parser().parse_args(["start", "--fd", "5", "--pid", "run/s.pid", "-l", "s.log",
                                                 "--log-size", "131072"]))
    assert (cfg.fd, cfg.pid_file, cfg.log_file, cfg.log_size) == (5, str(tmp_path / "run/s.pid"),
                                                                   str(tmp_path / "s.log"), 131072)
    path = write_toml(tmp_path, 'pid_file = "a.pid"\nlog_file = "/var/log/s.log"\n')
    cfg = load_config({"config": path})
    assert (cfg.pid_file, cfg.log_file, cfg.log_size, cfg.fd) == (str(tmp_path / "a.pid"), "/var/log/s.log",
                                                                  1 << 20, None)


def test_control_group(tmp_path: Path) -> None:
    """--control-group and the TOML key control_group: a name or a number, kept as given (resolved at start,
    before the sandbox); none by default; an empty value refused."""
    from shardswitch.cli import build_parser

    assert load_config({}).control_group is None
    cfg = load_config(build_parser().parse_args(["start", "--control-group", "kvm"]))
    assert cfg.control_group == "kvm"
    assert load_config({"config": write_toml(tmp_path, 'control_group = "4242"\n')}).control_group == "4242"
    with pytest.raises(ConfigError, match="control_group"):
        load_config({"config": write_toml(tmp_path, 'control_group = ""\n')})


def test_passt_short_options_and_none_values() -> None:
    """passt's short forms (-s -c -D -S -p -P -F -H -1) land where the long ones do; -D none / -S none empty the
    lists (what follows a none counts, -S takes space-separated domains); --map-host-loopback none is
    --no-map-gw; --map-guest-addr none maps nothing; -m 0 offers no MTU."""
    from shardswitch.cli import build_parser

    argv = ["start", "-s", "/tmp/v.sock", "-c", "/tmp/v.ctl", "-D", "192.0.2.1", "-D", "none", "-D", "192.0.2.2",
            "-S", "a.example b.example", "-p", "/tmp/v.pcap", "-P", "/tmp/v.pid", "-F", "5", "-H", "vm1",
            "--fqdn", "vm1.example.org", "-1", "--map-host-loopback", "none", "--map-guest-addr", "none",
            "-m", "0", "-f", "-e", "--vhost-user"]
    cfg = load_config(build_parser().parse_args(argv))
    assert (cfg.socket, cfg.control, cfg.dns, cfg.search) == ("/tmp/v.sock", "/tmp/v.ctl", ["192.0.2.2"],
                                                              ["a.example", "b.example"])
    assert (cfg.pcap, cfg.pid_file, cfg.fd, cfg.hostname, cfg.fqdn, cfg.one_off) == (
        "/tmp/v.pcap", "/tmp/v.pid", 5, "vm1", "vm1.example.org", True)
    assert (cfg.no_map_gw, cfg.map_host_loopback, cfg.map_guest_addr, cfg.mtu) == (True, None, None, 0)
    cfg = load_config(build_parser().parse_args(["start", "-D", "none", "-S", "none"]))
    assert (cfg.dns, cfg.search) == ([], [])


def test_none_overrides_the_file(tmp_path: Path) -> None:
    """A command-line none beats the file's value: --map-host-loopback none drops the file's address,
    --map-guest-addr none the file's mapping, -D none the file's servers."""
    path = write_toml(tmp_path, 'map_host_loopback = "10.0.2.2"\nmap_guest_addr = "10.0.2.3"\n'
                                'dns = ["192.0.2.1"]\n')
    cfg = load_config({"config": path, "map_host_loopback": "none", "map_guest_addr": "none", "dns": ["none"]})
    assert (cfg.map_host_loopback, cfg.no_map_gw, cfg.map_guest_addr, cfg.dns) == (None, True, None, [])


@pytest.mark.parametrize(("values", "message"), [
    ({"no_tcp": True, "tcp_ports": ["22"]}, "--no-tcp: no TCP handler, yet TCP ports are forwarded (-t 22)"),
    ({"no_udp": True, "udp_ports": ["53"]}, "--no-udp: no UDP handler, yet UDP ports are forwarded (-u 53)"),
    ({"hostname": "bad host"}, "-H/--hostname: 'bad host' is not a host name"),
    ({"hostname": "-lead"}, "-H/--hostname: '-lead' is not a host name"),
    ({"fqdn": "a..b"}, "--fqdn: Expected a domain name like example.org"),
    ({"trace": True, "quiet": True}, "--trace and -q/--quiet exclude each other"),
    ({"dns_host": ["127.0.0.53", "127.0.0.1"]}, "--dns-host: given twice (127.0.0.53 and 127.0.0.1): once per"),
])
def test_passt_option_errors(values: dict[str, Any], message: str) -> None:
    """The passt options refuse what passt refuses, naming the option."""
    assert message in error_of(values)


def test_new_passt_options_from_the_file(tmp_path: Path) -> None:
    """Every passt option has its TOML key."""
    path = write_toml(tmp_path, 'no_tcp = true\nno_udp = true\nhostname = "vm1"\nfqdn = "vm1.example.org"\n'
                                'no_dhcp_dns = true\nno_dhcp_search = true\nfreebind = true\ntrace = true\n'
                                'one_off = true\nmigrate_exit = true\nmigrate_no_linger = true\n'
                                'dns_host = ["127.0.0.53", "::1"]\nmtu = 0\nsearch = "none"\n')
    cfg = load_config({"config": path})
    assert (cfg.no_tcp, cfg.no_udp, cfg.hostname, cfg.fqdn, cfg.no_dhcp_dns, cfg.no_dhcp_search) == (
        True, True, "vm1", "vm1.example.org", True, True)
    assert (cfg.freebind, cfg.trace, cfg.one_off, cfg.migrate_exit, cfg.migrate_no_linger) == (True,) * 5
    assert (cfg.dns_host, cfg.dns_host6, cfg.mtu, cfg.search) == ("127.0.0.53", "::1", 0, [])


def test_ipv4_cidr_address_and_loopback_dns() -> None:
    """passt's -a 192.0.2.1/24 sets the IPv4 prefix length (mixing it with -n is an error, as passt's); -D
    127.0.0.1 / ::1 are given to the guest as they are (it is its own resolver)."""
    cfg = load_config({"address": ["192.0.2.1/24", "2001:db8::5/56"], "dns": ["127.0.0.1", "::1"]})
    assert (cfg.address, cfg.prefix_len, cfg.address6, cfg.prefix6_len) == ("192.0.2.1", 24, "2001:db8::5", 56)
    assert cfg.dns == ["127.0.0.1", "::1"]
    assert "given twice" in error_of({"address": ["192.0.2.1/24"], "prefix_len": ["16"]})
