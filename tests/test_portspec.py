"""The -t/-u SPEC parser: every form passt accepts, exclusions, 'all', and the errors."""

from __future__ import annotations

import pytest

from shardswitch.portspec import Forward, PortSpecError, parse, parse_all, read_ephemeral

EPH = (32768, 60999)


def ranges(forwards: list[Forward]) -> list[tuple[int, int, int]]:
    """(first, last, to_first) of each forward."""
    return [(f.first, f.last, f.to_first) for f in forwards]


def test_none_is_empty() -> None:
    """'none' forwards nothing."""
    assert parse("none") == []


def test_single_port_and_range() -> None:
    """PORT and PORT-PORT map onto themselves, bound to any address."""
    assert parse("22") == [Forward(None, None, 22, 22, 22)]
    assert ranges(parse("8000-8010")) == [(8000, 8010, 8000)]


def test_mapping_and_guest_port() -> None:
    """PORT:TO and ranges of the same length."""
    (fwd,) = parse("5000-5009:6000-6009")
    assert (fwd.first, fwd.last, fwd.to_first, fwd.to_last) == (5000, 5009, 6000, 6009)
    assert fwd.guest_port(5003) == 6003 and list(fwd.ports())[-1] == 5009
    assert ranges(parse("2222:22")) == [(2222, 2222, 22)]


def test_comma_list() -> None:
    """Several items in one SPEC."""
    assert ranges(parse("22,80:8080,1000-1001")) == [(22, 22, 22), (80, 80, 8080), (1000, 1001, 1000)]


def test_address_and_interface() -> None:
    """ADDR/, ADDR%IF/, %IF/ and bracketed addresses bind every item."""
    assert parse("127.0.0.1/53") == [Forward("127.0.0.1", None, 53, 53, 53)]
    assert parse("[::1]/53,54") == [Forward("::1", None, 53, 53, 53), Forward("::1", None, 54, 54, 54)]
    assert parse("::1%lo/80") == [Forward("::1", "lo", 80, 80, 80)]
    assert parse("%eth0/80:8080") == [Forward(None, "eth0", 80, 80, 8080)]
    assert parse("[10.0.0.1]/7") == [Forward("10.0.0.1", None, 7, 7, 7)]


def test_exclusions_cut_ranges_wherever_written() -> None:
    """~PORT[-PORT] removes ports from every range, before or after it."""
    assert ranges(parse("~5005,5000-5010")) == [(5000, 5004, 5000), (5006, 5010, 5006)]
    assert ranges(parse("5000-5010:6000-6010,~5000-5001,~5010")) == [(5002, 5009, 6002)]


def test_exclusions_only_means_all_but() -> None:
    """A SPEC of exclusions only forwards every non-ephemeral port except them."""
    got = ranges(parse("~1-1000,~2000", EPH))
    assert got == [(1001, 1999, 1001), (2001, 32767, 2001), (61000, 65535, 61000)]


def test_all_skips_port_zero_and_ephemeral() -> None:
    """'all' as passt: 1..65535 outside the ephemeral range."""
    assert ranges(parse("all", (40000, 50000))) == [(1, 39999, 1), (50001, 65535, 50001)]


@pytest.mark.parametrize(("spec", "words"), [
    ("", "empty"),
    ("abc", "bad port range 'abc'"),
    ("80-", "bad port range"),
    ("1-2-3", "bad port range"),
    ("65536", "out of range"),
    ("90-80", "ends before it starts"),
    ("80-81:90", "maps 2 ports onto 1"),
    ("80,,81", "empty item"),
    ("~80,~79-81", "overlapping excluded"),
    ("300.1.1.1/80", "bad address '300.1.1.1'"),
    ("1.2.3.4%/80", "bad interface name"),
    ("1.2.3.4%averyveryverylongname/80", "bad interface name"),
    ("auto", "only allowed for pasta"),
    ("80x", "bad port range '80x'"),
    ("+80", "bad port range"),
])
def test_errors_name_the_bad_part(spec: str, words: str) -> None:
    """Each error says what is wrong and where."""
    with pytest.raises(PortSpecError, match=words.replace("(", r"\(")):
        parse(spec)


def test_parse_all_modes_and_duplicates() -> None:
    """none/all alone only; a port forwarded twice on the same address is refused; the option is named."""
    assert ranges(parse_all(["22", "80:8080"])) == [(22, 22, 22), (80, 80, 8080)]
    assert parse_all(["none"]) == []
    with pytest.raises(PortSpecError, match="^-u: port forwarding mode 'none' conflicts"):
        parse_all(["none", "22"], "-u")
    with pytest.raises(PortSpecError, match="^-t: port 81 is forwarded twice"):
        parse_all(["80-81", "81"], "-t")
    with pytest.raises(PortSpecError, match="^-u: invalid port specifier 'x'"):
        parse_all(["x"], "-u")
    assert len(parse_all(["127.0.0.1/53", "::1/53"])) == 2


def test_read_ephemeral(tmp_path: object) -> None:
    """The kernel's range, or Linux's default when unreadable or absurd."""
    from pathlib import Path
    path = Path(str(tmp_path)) / "range"
    path.write_text("1024\t2048\n")
    assert read_ephemeral(str(path)) == (1024, 2048)
    path.write_text("junk")
    assert read_ephemeral(str(path)) == EPH
    assert read_ephemeral(str(path) + ".missing") == EPH


def test_config_validates_specs_at_load_time() -> None:
    """A bad -t/-u SPEC is a ConfigError naming the option and the problem; good ones load."""
    from shardswitch.settings import ConfigError, load_config

    cfg = load_config({"udp_ports": ["5000:6000"], "tcp_ports": ["~22"]})
    assert cfg.udp_ports == ["5000:6000"]
    with pytest.raises(ConfigError, match=r"-u/--udp-ports.*-u: invalid port specifier '70000'"):
        load_config({"udp_ports": ["70000"]})
    with pytest.raises(ConfigError, match=r"-t/--tcp-ports.*conflicts"):
        load_config({"tcp_ports": ["all", "22"]})


def test_dns_forward_is_offered_to_the_guest() -> None:
    """With --dns-forward and no --dns, DHCP offers the forwarding address (as passt); --dns wins."""
    from shardswitch.guest_addressing import resolve_addressing
    from shardswitch.settings import load_config
    from shardswitch.hostnet import HostNet, NetInfo

    info = NetInfo(route=HostNet(ifname="eth0", address="10.99.0.2", prefix_len=24, gateway="10.99.0.1"),
                   nameservers=["127.0.0.53"])
    cfg = load_config({"dns_forward": "10.99.0.3"})
    assert resolve_addressing(cfg, info).dns == ["10.99.0.3"]
    cfg = load_config({"dns_forward": "10.99.0.3", "dns": ["192.0.2.53"]})
    assert resolve_addressing(cfg, info).dns == ["192.0.2.53"]


@pytest.mark.parametrize(("spec", "expected"), [
    ("0.0.0.0/5000:192.0.2.5/6000", [Forward("0.0.0.0", None, 5000, 5000, 6000, "192.0.2.5")]),
    ("0.0.0.0/5000-5002:192.0.2.5", [Forward("0.0.0.0", None, 5000, 5002, 5000, "192.0.2.5")]),
    ("0.0.0.0/5000-5001:[192.0.2.5]/7000-7001", [Forward("0.0.0.0", None, 5000, 5001, 7000, "192.0.2.5")]),
    ("[::1]/80:[2001:db8::5]/8080", [Forward("::1", None, 80, 80, 8080, "2001:db8::5")]),
    ("::/80:[2001:db8::5]", [Forward("::", None, 80, 80, 80, "2001:db8::5")]),
    ("10.0.0.1/22:[::ffff:192.0.2.5]/2222", [Forward("10.0.0.1", None, 22, 22, 2222, "192.0.2.5")]),
    ("127.0.0.6%lo/22,80:192.0.2.6/8080", [Forward("127.0.0.6", "lo", 22, 22, 22),
                                           Forward("127.0.0.6", "lo", 80, 80, 8080, "192.0.2.6")]),
    ("*/22", [Forward(None, None, 22, 22, 22)]),
    ("*%eth0/22", [Forward(None, "eth0", 22, 22, 22)]),
    ("/22", [Forward(None, None, 22, 22, 22)]),
])
def test_target_address_and_any_address_forms(spec: str, expected: list[Forward]) -> None:
    """passt's full SPEC: a target address inside the guest (with or without ports, brackets allowed,
    IPv4-mapped as IPv4) and '*' (or nothing) before / as any address."""
    assert parse(spec) == expected


def test_all_to_a_target_address() -> None:
    """ADDR/all:TOADDR forwards every non-ephemeral port (exclusions cut out) to TOADDR."""
    got = parse("127.0.0.6/all:192.0.2.6,~22", (40000, 65535))
    assert [(f.first, f.last, f.to_addr) for f in got] == [(1, 21, "192.0.2.6"), (23, 39999, "192.0.2.6")]
    assert {f.addr for f in got} == {"127.0.0.6"}


@pytest.mark.parametrize(("spec", "words"), [
    ("5000:192.0.2.5/6000", "from any address .* cannot go to the IPv4 address 192.0.2.5; did you mean 0.0.0.0/"),
    ("%eth0/5000:[2001:db8::5]", r"did you mean \[::\]%eth0/"),
    ("22,5000:192.0.2.5/6000", "from any address .* cannot go to the IPv4 address 192.0.2.5"),
    ("0.0.0.0/5000:[2001:db8::5]/6000", r"forward from IPv4 \(0.0.0.0\) to IPv6 \(2001:db8::5\) unsupported"),
    ("[::1]/5000:192.0.2.5", r"forward from IPv6 \(::1\) to IPv4 \(192.0.2.5\)"),
    ("0.0.0.0/5000:0.0.0.0/6000", "target address '0.0.0.0' is unspecified"),
    ("0.0.0.0/5000:127.0.0.2", "is loopback"),
    ("0.0.0.0/5000:224.0.0.1", "is multicast"),
    ("0.0.0.0/5000:255.255.255.255", "is broadcast"),
    ("0.0.0.0/5000:192.0.2.300/6000", "bad target address '192.0.2.300'"),
    ("0.0.0.0/5000:host/6000", "bad target address 'host'"),
    ("0.0.0.0/5000:192.0.2.5/", "bad port range ''"),
    ("0.0.0.0/5000-5001:192.0.2.5/6000", "maps 2 ports onto 1"),
    ("0.0.0.0/5000:192.0.2.5/0", "maps to port 0"),
    ("0", "forwards port 0"),
    ("all,22", "'all' does not mix with port ranges"),
    ("0.0.0.0/all:192.0.2.5,all", "'all' given twice"),
    ("*%/22", "bad interface name"),
    ("*%../22", "bad interface name"),
    ("abc/22", "bad address 'abc'"),
    ("::1/auto", "only allowed for pasta"),
])
def test_malformed_target_forms_name_the_bad_part(spec: str, words: str) -> None:
    """Errors name the SPEC and what is wrong with it (passt's rules on target addresses)."""
    with pytest.raises(PortSpecError, match=words) as err:
        parse(spec)
    assert "auto" in spec or repr(spec) in str(err.value)


@pytest.mark.parametrize("spec", ["22", "2222:22", "8000-8010:9000-9010", "[::1]/53", "127.0.0.1%lo/80",
                                  "%eth0/80", "*%eth0/80:8080", "0.0.0.0/5000:192.0.2.5/6000",
                                  "[::]/80:[2001:db8::5]/8080"])
def test_format_reads_back(spec: str) -> None:
    """format_forward writes a rule in the SPEC syntax that parses back into the same rule."""
    from shardswitch.portspec import format_forward

    (fwd,) = parse(spec)
    assert parse(format_forward(fwd)) == [fwd]


def test_conflicts_as_passt() -> None:
    """Rules conflict when their listening addresses match (any address matches all, an unspecified one its
    family) and their ports overlap; interfaces do not matter."""
    from shardswitch.portspec import conflicts

    def one(spec: str) -> Forward:
        (fwd,) = parse(spec)
        return fwd

    assert conflicts(one("80-90"), one("127.0.0.1/85"))
    assert conflicts(one("0.0.0.0/80"), one("127.0.0.1/80"))
    assert not conflicts(one("0.0.0.0/80"), one("[::1]/80"))
    assert conflicts(one("%eth0/80"), one("%eth1/80"))
    assert not conflicts(one("127.0.0.1/80"), one("127.0.0.2/80"))
    assert not conflicts(one("80-90"), one("91"))
