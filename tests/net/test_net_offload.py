"""Checksum offload in the sans-IO codecs: partial checksums skipped on request, checksums left out on request."""

from __future__ import annotations

import socket

import pytest

from shardswitch.net import ipv4, ipv6, tcp, udp
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.endpoint import GuestEndpoint
from shardswitch.net.ipv4 import Ipv4Packet
from shardswitch.net.params import GuestParams
from shardswitch.net.tcp import Addressing, TcpFlag
from shardswitch.net.udp import UdpDatagram
from shardswitch.net.udp import UNCOMPUTED_CSUM6, build_frame6, parse6
from tests.net.offload_lib import l4_checksum, make_partial

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST4, GATEWAY4 = socket.inet_aton("10.0.2.15"), socket.inet_aton("10.0.2.2")
GUEST6 = socket.inet_pton(socket.AF_INET6, "fe80::5054:ff:fe12:3456")
ROUTER6 = socket.inet_pton(socket.AF_INET6, "fe80::1")
PAYLOAD = bytes(range(256)) * 40 + b"odd"


def tcp_frame(v6: bool) -> bytes:
    """A guest data segment with a full checksum."""
    src, dst = (GUEST6, ROUTER6) if v6 else (GUEST4, GATEWAY4)
    return tcp.build(Addressing(v6, OUR_MAC, GUEST_MAC, src, dst, 40000, 80), 1, 2, int(TcpFlag.ACK), 100,
                     payload=PAYLOAD)


def tcp_parse(frame: bytes, verify: bool) -> tcp.TcpSegment:
    """Parse the TCP segment of a frame to the switch."""
    if frame[12:14] == b"\x86\xdd":
        return tcp.parse6(ipv6.parse(memoryview(frame)[14:]), verify)
    return tcp.parse4(ipv4.parse(memoryview(frame)[14:]), verify)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tcp_partial_checksum_skipped_only_when_asked(v6: bool) -> None:
    """A partial checksum is refused when verified, accepted (same segment) when not; a full one passes both."""
    full = tcp_frame(v6)
    partial = make_partial(full)
    assert partial != full
    with pytest.raises(PacketError) as err:
        tcp_parse(partial, True)
    assert err.value.reason is DropReason.TCP_BAD_CHECKSUM
    seg = tcp_parse(partial, False)
    assert bytes(seg.payload) == PAYLOAD and seg.src_port == 40000 and seg.seq == 1
    assert bytes(tcp_parse(full, True).payload) == PAYLOAD


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tcp_malformed_still_refused_without_verification(v6: bool) -> None:
    """Skipping the checksum skips nothing else: a bad data offset is still TCP_MALFORMED."""
    frame = bytearray(make_partial(tcp_frame(v6)))
    frame[14 + (40 if v6 else 20) + 12] = 0x40          # data offset 16 bytes, shorter than a header
    with pytest.raises(PacketError) as err:
        tcp_parse(bytes(frame), False)
    assert err.value.reason is DropReason.TCP_MALFORMED


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tcp_pack_without_checksum(v6: bool) -> None:
    """csum=False leaves the TCP checksum 0 and everything else as with csum=True (IPv4 header checksum too)."""
    src, dst = (ROUTER6, GUEST6) if v6 else (GATEWAY4, GUEST4)
    a = Addressing(v6, GUEST_MAC, OUR_MAC, src, dst, 80, 40000)
    hl = a.headers_len
    bufs = []
    for csum in (True, False):
        buf = bytearray(hl) + bytearray(PAYLOAD)
        tcp.pack_into(buf, a, 7, 8, int(TcpFlag.ACK | TcpFlag.PSH), 500, csum=csum)
        bufs.append(bytes(buf))
    full, bare = bufs
    assert l4_checksum(bare) == 0 and l4_checksum(full) != 0
    start = hl - tcp.TCP_HLEN + tcp.CHECKSUM_OFFSET
    assert full[:start] == bare[:start] and full[start + 2:] == bare[start + 2:]
    if not v6:
        ipv4.parse(memoryview(bare)[14:])            # the IPv4 header checksum is still right
    assert tcp_parse(bare, False).seq == 7


def test_udp4_partial_and_uncomputed() -> None:
    """UDP over IPv4: a partial checksum passes only unverified; csum=False builds checksum 0 (none)."""
    frame = udp.build_frame(OUR_MAC, GUEST_MAC, int.from_bytes(GUEST4, "big"), int.from_bytes(GATEWAY4, "big"),
                            5000, 53, PAYLOAD)
    partial = make_partial(frame)
    packet = ipv4.parse(memoryview(partial)[14:])
    with pytest.raises(PacketError) as err:
        udp.parse(packet)
    assert err.value.reason is DropReason.UDP_BAD_CHECKSUM
    assert bytes(udp.parse(packet, verify=False).payload) == PAYLOAD
    bare = udp.build_frame(GUEST_MAC, OUR_MAC, int.from_bytes(GATEWAY4, "big"), int.from_bytes(GUEST4, "big"),
                           53, 5000, PAYLOAD, csum=False)
    assert l4_checksum(bare) == 0
    assert bytes(udp.parse(ipv4.parse(memoryview(bare)[14:])).payload) == PAYLOAD   # 0 = no checksum: valid


def test_udp6_partial_and_uncomputed() -> None:
    """UDP over IPv6: partial passes only unverified; csum=False puts a non-zero placeholder (0 is refused)."""
    frame = build_frame6(OUR_MAC, GUEST_MAC, GUEST6, ROUTER6, 5000, 53, PAYLOAD)
    packet = ipv6.parse(memoryview(make_partial(frame))[14:])
    with pytest.raises(PacketError):
        parse6(packet)
    assert bytes(parse6(packet, verify=False).payload) == PAYLOAD
    bare = build_frame6(GUEST_MAC, OUR_MAC, ROUTER6, GUEST6, 53, 5000, PAYLOAD, csum=False)
    assert l4_checksum(bare) == UNCOMPUTED_CSUM6 != 0
    zero = bytearray(bare)
    zero[14 + 40 + 6:14 + 40 + 8] = b"\0\0"
    with pytest.raises(PacketError):
        parse6(ipv6.parse(memoryview(bytes(zero))[14:]), verify=False)     # 0 is never a checksum over IPv6


def test_endpoint_passes_csum_partial_to_udp_and_forgets_it() -> None:
    """handle_frame(csum_partial=True): the UDP parser skips the checksum, handlers see the flag on the packet,
    and the next frame's packet does not have it."""
    ep = GuestEndpoint(GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2"))
    seen: list[tuple[bytes, bool]] = []

    def handler(eth_src: bytes, packet: Ipv4Packet, datagram: UdpDatagram, now: float, out: list[bytes]) -> None:
        """Record the payload and the flag as the handler sees them."""
        seen.append((bytes(datagram.payload), packet.csum_partial))

    ep.register_udp_port(9999, handler)
    frame = udp.build_frame(ep.resolved.our_mac, GUEST_MAC, int.from_bytes(GUEST4, "big"),
                            int.from_bytes(GATEWAY4, "big"), 5000, 9999, PAYLOAD)
    partial = memoryview(make_partial(frame))
    assert ep.handle_frame(partial, 0.0, []) is DropReason.UDP_BAD_CHECKSUM
    assert ep.handle_frame(partial, 0.0, [], csum_partial=True) is None
    assert seen == [(PAYLOAD, True)]
    assert ep.handle_frame(memoryview(frame), 0.0, []) is None
    assert seen[-1] == (PAYLOAD, False)
