"""IPv6 codec (header, extension-header walk, addresses) and the IPv6 guest parameters.

Packets are built with the independent IPv6/ICMPv6 reference helpers of
tests/net/ipv6kit.py (packed with their own struct formats, checksummed word
by word with :func:`rfc1071`), which test_net_icmp.py and test_net_ndp.py use too.
"""

from __future__ import annotations

import random
import struct

import pytest

from shardswitch.net import checksum, ipv6
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.params import GuestParams, ParamsError, resolve
from tests.net.ipv6kit import ALL_NODES, GUEST_LL, OUR_LL, icmpv6_checksum, ip6, ipv6_packet
from tests.net.net_testlib import GUEST_MAC, OUR_MAC

# --- Reference helpers ------------------------------------------------------------------

def ext_header(next_header: int, units: int = 0, *, fill: int = 0, routing_left: int = 0) -> bytes:
    """An extension header of ``(units + 1) * 8`` bytes (routing: type 4, ``routing_left``)."""
    body = bytearray(bytes((next_header, units)) + bytes([fill]) * (6 + 8 * units))
    if routing_left:
        body[2], body[3] = 4, routing_left
    return bytes(body)


# --- Parser ---------------------------------------------------------------------------------

SRC, DST = ip6("2001:db8::15"), ip6("2001:db8::1")


def parse6(data: bytes) -> ipv6.Ipv6Packet:
    """Parse through a memoryview, as the endpoint does."""
    return ipv6.parse(memoryview(data))


def error6(data: bytes) -> DropReason:
    """The reason ipv6.parse rejects ``data``."""
    with pytest.raises(PacketError) as exc:
        parse6(data)
    return exc.value.reason


def test_parse_fields_and_padding() -> None:
    """Fields decode; trailing Ethernet padding is cut from datagram and payload."""
    packet = ipv6_packet(SRC, DST, 17, b"payload", hop_limit=7, traffic_class=0xB8,
                         flow_label=0xABCDE)
    parsed = parse6(packet + bytes(13))
    assert (parsed.src, parsed.dst, parsed.next_header, parsed.hop_limit,
            parsed.traffic_class) == (SRC, DST, 17, 7, 0xB8)
    assert bytes(parsed.payload) == b"payload"
    assert bytes(parsed.datagram) == packet
    assert isinstance(parsed.src, bytes) and isinstance(parsed.payload, memoryview)


def test_parse_empty_payload() -> None:
    """A header alone with No Next Header is a valid (empty) packet."""
    parsed = parse6(ipv6_packet(SRC, DST, 59, b""))
    assert parsed.next_header == ipv6.NextHeader.NO_NEXT_HEADER and len(parsed.payload) == 0


@pytest.mark.parametrize("data", [
    b"",
    ipv6_packet(SRC, DST, 58, b"")[:39],
    b"\x45" + ipv6_packet(SRC, DST, 58, b"x")[1:],          # version 4
    ipv6_packet(SRC, DST, 58, b"abcd")[:-1],                # payload length past the buffer
    ipv6_packet(ip6("ff02::1"), DST, 58, b"abcd"),          # multicast source
    b"\x60\0\0\0\xff\xff\x3a\x40" + bytes(32) + bytes(100),  # 65535-byte payload, 100 present
])
def test_parse_malformed(data: bytes) -> None:
    """Every inconsistency of the fixed header is IPV6_MALFORMED."""
    assert error6(data) is DropReason.IPV6_MALFORMED


def test_extension_headers_skipped() -> None:
    """Hop-by-hop, destination options and a spent routing header are walked over."""
    upper = b"\x80\0\0\0\0\1\0\2tail"
    chain = (ext_header(60)                    # hop-by-hop -> destination options
             + ext_header(43, 1, fill=1)       # destination options -> routing
             + ext_header(60)                  # routing, segments left 0 -> dest. options
             + ext_header(58, 2, fill=0xFF))   # destination options -> ICMPv6
    parsed = parse6(ipv6_packet(SRC, DST, 0, chain + upper))
    assert parsed.next_header == 58
    assert bytes(parsed.payload) == upper
    assert len(parsed.datagram) == 40 + 8 + 16 + 8 + 24 + len(upper)


def test_extension_header_ending_in_no_next_header_or_esp() -> None:
    """The walk stops at any non-extension value (59, ESP) and reports it."""
    assert parse6(ipv6_packet(SRC, DST, 60, ext_header(59) + b"junk")).next_header == 59
    esp = parse6(ipv6_packet(SRC, DST, 0, ext_header(50) + b"\0\0\0\1\0\0\0\1"))
    assert esp.next_header == 50 and len(esp.payload) == 8


@pytest.mark.parametrize("first, chain, reason", [
    (60, ext_header(0) + ext_header(58), DropReason.IPV6_MALFORMED),       # HBH not first
    (0, b"\x3a", DropReason.IPV6_MALFORMED),                               # 1 byte of header
    (0, b"", DropReason.IPV6_MALFORMED),                                   # no header at all
    (60, ext_header(58, 1)[:15], DropReason.IPV6_MALFORMED),               # 16-byte hdr, 15 there
    (60, ext_header(58, 255)[:200], DropReason.IPV6_MALFORMED),            # 2 KiB hdr, 200 there
    (60, ext_header(60) * 3 + b"\x3a", DropReason.IPV6_MALFORMED),         # last one truncated
    (44, bytes(8), DropReason.IPV6_FRAGMENT),                              # fragment first
    (0, ext_header(60) + ext_header(44) + bytes(8), DropReason.IPV6_FRAGMENT),
    (43, ext_header(58, 2, routing_left=1), DropReason.IPV6_ROUTING),
    (60, ext_header(60) * 8 + ext_header(58), DropReason.IPV6_MALFORMED),  # 9 headers
])
def test_extension_header_errors(first: int, chain: bytes, reason: DropReason) -> None:
    """Bounds, order, fragments, live source routes and the header count are enforced."""
    assert error6(ipv6_packet(SRC, DST, first, chain)) is reason


def test_extension_header_limit_and_payload_length_bound() -> None:
    """Eight headers are fine; a header inside the buffer but past the payload length is not."""
    parsed = parse6(ipv6_packet(SRC, DST, 60, ext_header(60) * 7 + ext_header(58) + b"m" * 8))
    assert parsed.next_header == 58 and bytes(parsed.payload) == b"m" * 8
    packet = bytearray(ipv6_packet(SRC, DST, 60, ext_header(58, 1)))
    struct.pack_into("!H", packet, 4, 8)  # payload length covers only half the header
    assert error6(bytes(packet)) is DropReason.IPV6_MALFORMED


def test_walk_extension_headers_directly() -> None:
    """The walker works on any datagram view and returns the upper-layer offset."""
    datagram = memoryview(ipv6_packet(SRC, DST, 0, ext_header(6, 1) + b"tcp!"))
    assert ipv6.walk_extension_headers(datagram, 0) == (6, 56)
    assert ipv6.walk_extension_headers(datagram, 17) == (17, 40)


# --- Builder, checksum, addresses -------------------------------------------------------------

def test_pack_header_matches_reference() -> None:
    """pack_header_into writes what the reference packer writes, and parses back."""
    buf = bytearray(4) + bytearray(40)
    ipv6.pack_header_into(buf, 4, SRC, DST, 58, 12, hop_limit=255, traffic_class=0x10,
                          flow_label=0x12345)
    expected = ipv6_packet(SRC, DST, 58, bytes(12), hop_limit=255, traffic_class=0x10,
                           flow_label=0x12345)[:40]
    assert bytes(buf[4:]) == expected
    with pytest.raises(ValueError):
        ipv6.pack_header_into(bytearray(40), 0, SRC, DST, 58, 65536)


@pytest.mark.parametrize("length", [0, 1, 7, 8, 63, 1000])
def test_pseudo_header_checksum_matches_reference(length: int) -> None:
    """checksum(data, pseudo_header(...)) equals the word-by-word RFC 8200 computation."""
    rng = random.Random(length)
    data = rng.randbytes(length)
    src, dst = rng.randbytes(16), rng.randbytes(16)
    ours = checksum.checksum(data, ipv6.pseudo_header(src, dst, 58, length))
    assert ours == icmpv6_checksum(src, dst, data)


def test_address_helpers() -> None:
    """EUI-64, solicited-node, multicast MAC, prefix, predicates and text conversion."""
    assert ipv6.link_local_from_mac(OUR_MAC) == OUR_LL
    assert ipv6.link_local_from_mac(GUEST_MAC) == GUEST_LL
    assert ipv6.solicited_node(ip6("2001:db8::12:3456")) == ip6("ff02::1:ff12:3456")
    assert ipv6.is_solicited_node(ip6("ff02::1:ff12:3456"))
    assert not ipv6.is_solicited_node(ip6("ff02::1")) and not ipv6.is_solicited_node(SRC)
    assert ipv6.multicast_mac(ALL_NODES) == bytes.fromhex("333300000001")
    assert ipv6.multicast_mac(ip6("ff02::1:ff12:3456")) == bytes.fromhex("3333ff123456")
    assert ipv6.prefix_of(ip6("2001:db8:1:2:3:4:5:6"), 64) == ip6("2001:db8:1:2::")
    assert ipv6.prefix_of(ip6("2001:db8:1:2:3:4:5:6"), 28) == ip6("2001:db0::")
    assert ipv6.prefix_of(SRC, 128) == SRC and ipv6.prefix_of(SRC, 0) == bytes(16)
    assert ipv6.is_link_local(OUR_LL) and ipv6.is_link_local(ip6("febf::1"))
    assert not ipv6.is_link_local(ip6("fec0::1")) and not ipv6.is_link_local(SRC)
    assert ipv6.is_multicast(ALL_NODES) and not ipv6.is_multicast(SRC)
    assert ipv6.is_unspecified(bytes(16)) and not ipv6.is_unspecified(SRC)
    assert ipv6.addr_from_str("2001:DB8::15") == SRC
    assert ipv6.addr_to_str(memoryview(OUR_LL)) == "fe80::9855:9aff:fe55:9a55"
    for bad in ("", "1.2.3.4", "2001:db8::1::2", "fe80::1%eth0", "2001:db8::g"):
        with pytest.raises(ValueError):
            ipv6.addr_from_str(bad)


# --- Guest parameters --------------------------------------------------------------------------

def params6(**changes: object) -> GuestParams:
    """Valid IPv4 parameters plus the given IPv6 fields."""
    base: dict[str, object] = {"address": "10.0.2.15", "prefix_len": 24, "gateway": "10.0.2.2"}
    base.update(changes)
    return GuestParams(**base)  # type: ignore[arg-type]


def test_params_ipv6_defaults() -> None:
    """Without IPv6 settings: no address, gateway is our EUI-64 link-local, no DNS."""
    resolved = resolve(params6())
    assert resolved.address6 is None and resolved.prefix6_len == 64
    assert resolved.our_ll6 == OUR_LL and resolved.gateway6 == OUR_LL
    assert resolved.dns6 == ()
    other_mac = resolve(params6(our_mac="02:00:00:00:00:01"))
    assert other_mac.our_ll6 == ip6("fe80::ff:fe00:1") == other_mac.gateway6


def test_params_ipv6_resolved() -> None:
    """Addresses come out packed; the link-local gateway and DNS servers are allowed."""
    resolved = resolve(params6(address6="2001:db8::15", prefix6_len=48, gateway6="fe80::1",
                               dns6=["2001:4860:4860::8888", "fe80::53"]))
    assert resolved.address6 == SRC and resolved.prefix6_len == 48
    assert resolved.gateway6 == ip6("fe80::1")
    assert resolved.dns6 == (ip6("2001:4860:4860::8888"), ip6("fe80::53"))
    assert resolve(params6(address6="fd00::2", gateway6="fd00::1")).gateway6 == ip6("fd00::1")


@pytest.mark.parametrize("changes", [
    {"address6": "nonsense"},
    {"address6": "10.0.2.15"},
    {"address6": "ff02::1"},
    {"address6": "::"},
    {"address6": "::1"},
    {"address6": "::ffff:10.0.2.15"},
    {"address6": "fe80::15"},
    {"address6": "2001:db8::15%eth0"},
    {"address6": "2001:db8::", "prefix6_len": 64},
    {"prefix6_len": 0},
    {"prefix6_len": 129},
    {"address6": "2001:db8::15", "mtu": 1279},
    {"gateway6": "ff02::2"},
    {"gateway6": "::"},
    {"address6": "2001:db8::15", "gateway6": "2001:db8::15"},
    {"dns6": ["2001:db8::53", "ff05::1:3"]},
    {"dns6": ["8.8.8.8"]},
])
def test_params_ipv6_rejected(changes: dict[str, object]) -> None:
    """Each invalid IPv6 setting is a ParamsError."""
    with pytest.raises(ParamsError):
        resolve(params6(**changes))


def test_params_small_mtu_without_ipv6_still_fine() -> None:
    """An IPv4-only guest may keep an MTU under 1280."""
    assert resolve(params6(mtu=576)).mtu == 576


# --- Fuzz ----------------------------------------------------------------------------------------

def test_fuzz_parse_never_raises_anything_else() -> None:
    """Random and mutated packets: a parsed packet within bounds, or a PacketError."""
    rng = random.Random(0x1B6)
    seeds = [
        ipv6_packet(SRC, DST, 58, b"\x80\0\0\0\0\1\0\1"),
        ipv6_packet(SRC, DST, 0, ext_header(60) + ext_header(43) + ext_header(58) + bytes(8)),
        ipv6_packet(SRC, DST, 60, ext_header(44) + bytes(8)),
    ]
    verdicts: dict[object, int] = {}
    for i in range(3000):
        if i % 3 == 0:
            data = bytearray(b"\x60" + rng.randbytes(rng.randrange(0, 120)))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 5)):
                pos = rng.randrange(len(data))
                data[pos] = rng.choice((0, 43, 44, 58, 60, 255, rng.randrange(256)))
            if rng.random() < 0.3:
                del data[rng.randrange(len(data) + 1):]
        try:
            parsed = parse6(bytes(data))
        except PacketError as exc:
            verdicts[exc.reason] = verdicts.get(exc.reason, 0) + 1
            continue
        verdicts["ok"] = verdicts.get("ok", 0) + 1
        assert len(parsed.datagram) <= len(data)
        assert len(parsed.payload) <= len(parsed.datagram) - 40
        assert parsed.next_header not in (0, 43, 44, 60)
    for reason in ("ok", DropReason.IPV6_MALFORMED, DropReason.IPV6_FRAGMENT,
                   DropReason.IPV6_ROUTING):
        assert verdicts.get(reason, 0) > 0, reason
