"""Ethernet, IPv4 and UDP codecs and guest parameter validation."""

from __future__ import annotations

import struct

import pytest

from shardswitch.net import checksum, eth, ipv4, udp
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.params import GuestParams, ParamsError, resolve
from tests.net.net_testlib import (GUEST_MAC, OUR_MAC, decode_udp_frame, ip, ipv4_packet,
                                   rfc1071, udp_datagram)

SRC, DST = ip("10.0.2.15"), ip("10.0.2.2")


def reason(exc: pytest.ExceptionInfo[PacketError]) -> DropReason:
    """The drop reason carried by a caught PacketError."""
    return exc.value.reason


# --- Ethernet ----------------------------------------------------------------------------

def test_eth_parse_and_pack_round_trip() -> None:
    """A packed header parses back to the same fields."""
    buf = bytearray(14)
    eth.pack_header_into(buf, 0, OUR_MAC, GUEST_MAC, eth.EtherType.ARP)
    assert eth.parse_header(memoryview(buf)) == (OUR_MAC, GUEST_MAC, 0x0806)


def test_eth_truncated() -> None:
    """13 bytes is not a frame."""
    with pytest.raises(PacketError) as exc:
        eth.parse_header(memoryview(bytes(13)))
    assert reason(exc) is DropReason.TRUNCATED


def test_mac_text() -> None:
    """MAC text parsing and formatting, and the group/valid-source predicates."""
    assert eth.mac_from_str("9a:55:9A:55:9a:5") == bytes.fromhex("9a559a559a05")
    assert eth.mac_from_str("52-54-00-12-34-56") == GUEST_MAC
    assert eth.mac_to_str(GUEST_MAC) == "52:54:00:12:34:56"
    for bad in ("", "52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:5g",
                "52:54:00:12:34:+5", "52:54:00:12:34:567", "52:54:00:12:34: 5"):
        with pytest.raises(ValueError):
            eth.mac_from_str(bad)
    assert eth.is_multicast(eth.BROADCAST_MAC) and eth.is_multicast(b"\x01\0^\0\0\1")
    assert not eth.is_multicast(GUEST_MAC)
    assert eth.is_valid_source(GUEST_MAC)
    assert not eth.is_valid_source(eth.ZERO_MAC) and not eth.is_valid_source(eth.BROADCAST_MAC)


# --- IPv4 --------------------------------------------------------------------------------

def parse_ip(data: bytes) -> ipv4.Ipv4Packet:
    """Parse through a memoryview, as the endpoint does."""
    return ipv4.parse(memoryview(data))


def ip_error(data: bytes) -> DropReason:
    """The reason ipv4.parse rejects ``data``."""
    with pytest.raises(PacketError) as exc:
        parse_ip(data)
    return reason(exc)


def test_ipv4_parse_valid_with_padding_and_options() -> None:
    """Fields decode; Ethernet padding is cut; options are skipped."""
    packet = ipv4_packet(SRC, DST, 17, b"payload", ttl=9)
    parsed = parse_ip(packet + bytes(10))
    assert (parsed.src, parsed.dst, parsed.proto, parsed.ttl) == (0x0A00020F, 0x0A000202, 17, 9)
    assert bytes(parsed.payload) == b"payload" and len(parsed.datagram) == len(packet)
    with_options = ipv4_packet(SRC, DST, 6, b"xy", options=b"\x01\x01\x01\x00")
    assert bytes(parse_ip(with_options).payload) == b"xy"


def test_ipv4_dont_fragment_is_fine() -> None:
    """DF alone is not a fragment."""
    assert parse_ip(ipv4_packet(SRC, DST, 17, b"x", frag=0x4000)).proto == 17


@pytest.mark.parametrize("frag", [0x2000, 0x0001, 0x1FFF, 0x6000 | 5])
def test_ipv4_fragments_dropped(frag: int) -> None:
    """More-fragments or a non-zero offset: not reassembled."""
    assert ip_error(ipv4_packet(SRC, DST, 17, b"x", frag=frag)) is DropReason.IPV4_FRAGMENT


def test_ipv4_malformed_headers() -> None:
    """Short buffer, version, IHL and total length inconsistencies."""
    good = ipv4_packet(SRC, DST, 17, b"abcd")
    assert ip_error(good[:19]) is DropReason.IPV4_MALFORMED
    assert ip_error(bytes([0x65]) + good[1:]) is DropReason.IPV4_MALFORMED  # version 6
    assert ip_error(bytes([0x44]) + good[1:]) is DropReason.IPV4_MALFORMED  # IHL 4
    assert ip_error(bytes([0x4F]) + good[1:]) is DropReason.IPV4_MALFORMED  # IHL past buffer
    too_long = good[:2] + struct.pack("!H", len(good) + 1) + good[4:]
    assert ip_error(too_long) is DropReason.IPV4_MALFORMED
    too_short = good[:2] + struct.pack("!H", 19) + good[4:]
    assert ip_error(too_short) is DropReason.IPV4_MALFORMED


def test_ipv4_bad_checksum() -> None:
    """A corrupted header checksum is reported as such."""
    assert ip_error(ipv4_packet(SRC, DST, 17, b"x", good_checksum=False)) is \
        DropReason.IPV4_BAD_CHECKSUM


def test_ipv4_pack_header() -> None:
    """A built header has a checksum the reference accepts, and parses back."""
    buf = bytearray(24)
    ipv4.pack_header_into(buf, 0, 0x0A000202, 0xFFFFFFFF, 17, 4, ttl=3)
    assert rfc1071(bytes(buf[:20])) == 0
    parsed = parse_ip(bytes(buf))
    assert (parsed.src, parsed.dst, parsed.ttl, len(parsed.payload)) == (0x0A000202, 0xFFFFFFFF,
                                                                        3, 4)
    with pytest.raises(ValueError):
        ipv4.pack_header_into(bytearray(20), 0, 1, 2, 17, 0xFFFF)


def test_ipv4_address_text() -> None:
    """Text conversions at the edges."""
    assert ipv4.addr_from_str("10.0.2.15") == 0x0A00020F
    assert ipv4.addr_to_str(0x0A00020F) == "10.0.2.15"


# --- UDP ---------------------------------------------------------------------------------

def parse_udp(datagram: bytes, src: bytes = SRC, dst: bytes = DST) -> udp.UdpDatagram:
    """Parse ``datagram`` wrapped in a valid IPv4 packet."""
    return udp.parse(parse_ip(ipv4_packet(src, dst, 17, datagram)))


def udp_error(datagram: bytes) -> DropReason:
    """The reason udp.parse rejects ``datagram``."""
    with pytest.raises(PacketError) as exc:
        parse_udp(datagram)
    return reason(exc)


def test_udp_parse_valid() -> None:
    """Ports and payload; a zero checksum means none; odd payload lengths."""
    for payload in (b"", b"a", b"hello", bytes(301)):
        parsed = parse_udp(udp_datagram(SRC, DST, 68, 67, payload))
        assert (parsed.src_port, parsed.dst_port, bytes(parsed.payload)) == (68, 67, payload)
    assert bytes(parse_udp(udp_datagram(SRC, DST, 1, 2, b"x", checksum=False)).payload) == b"x"


def test_udp_length_shorter_than_ip_payload_trims() -> None:
    """Trailing bytes inside the IPv4 payload are not part of the datagram."""
    datagram = udp_datagram(SRC, DST, 1, 2, b"data")
    assert bytes(parse_udp(datagram + b"junk").payload) == b"data"


def test_udp_malformed_and_bad_checksum() -> None:
    """Short header, bad lengths, corrupted payload."""
    datagram = udp_datagram(SRC, DST, 1, 2, b"data")
    assert udp_error(datagram[:7]) is DropReason.UDP_MALFORMED
    assert udp_error(datagram[:4] + struct.pack("!H", 7) + datagram[6:]) is \
        DropReason.UDP_MALFORMED
    assert udp_error(datagram[:4] + struct.pack("!H", 13) + datagram[6:]) is \
        DropReason.UDP_MALFORMED
    assert udp_error(datagram[:-1] + b"X") is DropReason.UDP_BAD_CHECKSUM
    with pytest.raises(PacketError) as exc:  # checksum covers the pseudo-header
        parse_udp(datagram, src=ip("10.0.2.16"))
    assert reason(exc) is DropReason.UDP_BAD_CHECKSUM


def test_udp_build_frame_verified_independently() -> None:
    """Headers, lengths and both checksums as a strict receiver checks them."""
    for payload in (b"", b"x", b"odd-length", bytes(300)):
        frame = udp.build_frame(GUEST_MAC, OUR_MAC, 0x0A000202, 0xFFFFFFFF, 67, 68, payload)
        got = decode_udp_frame(frame)
        assert (got.eth_dst, got.eth_src, got.ip_src, got.ip_dst) == \
            (GUEST_MAC, OUR_MAC, DST, b"\xff" * 4)
        assert (got.sport, got.dport, got.payload, got.ttl) == (67, 68, payload, 64)


def test_udp_zero_checksum_is_sent_as_ffff() -> None:
    """A payload whose checksum computes to 0 goes out as 0xFFFF (RFC 768)."""
    src, dst = 0x0A000202, 0x0A00020F
    start = checksum.pseudo_header_v4(src, dst, 17, 10) + 67 + 68 + 10
    word = 0xFFFF - checksum.ones_sum(b"", start)
    frame = udp.build_frame(GUEST_MAC, OUR_MAC, src, dst, 67, 68, struct.pack("!H", word))
    assert frame[40:42] == b"\xff\xff"
    decode_udp_frame(frame)


def test_udp_build_frame_rejects_oversize() -> None:
    """Payloads that cannot fit an IPv4 datagram are a caller bug."""
    with pytest.raises(ValueError):
        udp.build_frame(GUEST_MAC, OUR_MAC, 1, 2, 3, 4, bytes(udp.MAX_PAYLOAD + 1))


# --- Parameters --------------------------------------------------------------------------

def params(**changes: object) -> GuestParams:
    """Valid parameters with ``changes`` applied."""
    base: dict[str, object] = {"address": "10.0.2.15", "prefix_len": 24, "gateway": "10.0.2.2"}
    base.update(changes)
    return GuestParams(**base)  # type: ignore[arg-type]


def test_resolve_defaults() -> None:
    """Addresses become ints, the MAC bytes, the netmask is derived."""
    resolved = resolve(params(dns=["10.0.2.3"], search=["example.com."]))
    assert resolved.address == 0x0A00020F and resolved.gateway == 0x0A000202
    assert resolved.netmask == 0xFFFFFF00 and resolved.gateway_on_link
    assert resolved.our_mac == OUR_MAC and resolved.mtu == 65520 and resolved.lease_time == 3600
    assert resolved.dns == (0x0A000203,) and resolved.search == ("example.com",)
    assert not resolve(params(gateway="192.168.1.1")).gateway_on_link
    assert resolve(params(prefix_len=32)).netmask == 0xFFFFFFFF


@pytest.mark.parametrize("changes", [
    {"address": "10.0.2"}, {"address": "0.0.0.0"}, {"address": "224.0.0.1"},
    {"address": "127.0.0.1"}, {"address": "255.255.255.255"}, {"gateway": "10.0.2.15"},
    {"gateway": "nonsense"}, {"prefix_len": 0}, {"prefix_len": 33}, {"address": "10.0.2.0"},
    {"address": "10.0.2.255"}, {"mtu": 67}, {"mtu": 65536}, {"lease_time": 0},
    {"lease_time": 1 << 32}, {"our_mac": "ff:ff:ff:ff:ff:ff"}, {"our_mac": "00:00:00:00:00:00"},
    {"our_mac": "9a:55"}, {"dns": ["10.0.2.300"]}, {"dns": ["0.0.0.0"]}, {"search": [""]},
    {"search": ["a..b"]}, {"search": ["x" * 64 + ".com"]}, {"search": [".".join(["abc"] * 64)]},
    {"search": ["bad domain.com"]}, {"search": ["dömäin.de"]},
])
def test_resolve_rejects(changes: dict[str, object]) -> None:
    """Every invalid field is reported as a ParamsError."""
    with pytest.raises(ParamsError):
        resolve(params(**changes))
