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
