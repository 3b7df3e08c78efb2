"""The dispatcher: drop reasons, pluggable handlers (IPv4 and IPv6 UDP ports), DHCPv6 service, and a fuzz loop."""

from __future__ import annotations

import logging
import random
import struct

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.dhcp6 import DHCP6_Advertise, DHCP6_Reply  # noqa: E402
from scapy.layers.inet6 import UDP, ICMPv6ND_RA  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from shardswitch.net import DropReason, GuestEndpoint, GuestParams, PacketError  # noqa: E402
from shardswitch.net.endpoint import Service  # noqa: E402
from shardswitch.net.ipv4 import Ipv4Packet  # noqa: E402
from shardswitch.net.ipv6 import Ipv6Packet  # noqa: E402
from shardswitch.net.udp import UdpDatagram  # noqa: E402
from tests.net.dhcpv6kit import decode as dhcpv6_decode  # noqa: E402
from tests.net.dhcpv6kit import make_endpoint as make_endpoint6  # noqa: E402
from tests.net.dhcpv6kit import solicit, udp6_frame  # noqa: E402
from tests.net.ipv6kit import ip6  # noqa: E402
from tests.net.ndpkit import ns_frame, rs_frame  # noqa: E402
from tests.net.net_testlib import (BROADCAST_MAC, GUEST_MAC, OUR_MAC, arp_frame,  # noqa: E402
                                   decode_arp_frame, decode_dhcp_reply, dhcp_message,
                                   dhcp_options, eth_frame, ip, ipv4_packet, udp_frame, DhcpTestClient)

GUEST_IP, GATEWAY = ip("10.0.2.15"), ip("10.0.2.2")


@pytest.fixture
def endpoint() -> GuestEndpoint:
    """An endpoint with DNS and search options, so DHCP replies are full."""
    return GuestEndpoint(GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2",
                                     dns=["10.0.2.3"], search=["example.com", "x.example.com"]))


def verdict(endpoint: GuestEndpoint, frame: bytes) -> DropReason | None:
    """Feed one frame, return the verdict."""
    return endpoint.handle_frame(memoryview(frame), 0.0, [])


def ip_frame(proto: int, payload: bytes, **kwargs: object) -> bytes:
    """An IPv4 frame from the guest to the gateway."""
    return eth_frame(OUR_MAC, GUEST_MAC, 0x0800,
                     ipv4_packet(GUEST_IP, GATEWAY, proto, payload, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(("frame", "reason"), [
    (b"", DropReason.TRUNCATED),
    (bytes(13), DropReason.TRUNCATED),
    (eth_frame(b"\x33\x33\0\0\0\x01", GUEST_MAC, 0x86DD, bytes(40)), DropReason.IPV6_MALFORMED),
    (eth_frame(OUR_MAC, GUEST_MAC, 0x8100, bytes(46)), DropReason.ETHERTYPE_UNHANDLED),
    (eth_frame(b"\x01\x80\xc2\0\0\x0e", GUEST_MAC, 0x88CC, bytes(46)),
     DropReason.ETHERTYPE_UNHANDLED),
    (eth_frame(OUR_MAC, GUEST_MAC, 0x0800, bytes(10)), DropReason.IPV4_MALFORMED),
    (ip_frame(1, b"\x08\0\0\0\0\0\0\0"), DropReason.IP_PROTO_UNHANDLED),
    (ip_frame(6, bytes(20)), DropReason.IP_PROTO_UNHANDLED),
    (ip_frame(17, b"x", good_checksum=False), DropReason.IPV4_BAD_CHECKSUM),
    (ip_frame(17, b"x", frag=0x2000), DropReason.IPV4_FRAGMENT),
    (ip_frame(17, b"short"), DropReason.UDP_MALFORMED),
    (udp_frame(GUEST_IP, GATEWAY, 40000, 53, b"query", eth_dst=OUR_MAC),
     DropReason.UDP_PORT_UNHANDLED),
])
def test_drop_reasons(endpoint: GuestEndpoint, frame: bytes, reason: DropReason) -> None:
    """Each kind of frame we do not handle yet maps to its reason and is counted."""
    assert verdict(endpoint, frame) is reason
    assert verdict(endpoint, frame) is reason
    assert endpoint.drops[reason] == 2
    assert sum(endpoint.drops.values()) == 2


def test_udp_checksum_error_through_endpoint(endpoint: GuestEndpoint) -> None:
    """A corrupted DHCP payload fails the UDP checksum before DHCP sees it."""
    frame = bytearray(udp_frame(bytes(4), b"\xff" * 4, 68, 67,
                                dhcp_message(options=dhcp_options((53, b"\x01")))))
    frame[-1] ^= 0x55
    assert verdict(endpoint, bytes(frame)) is DropReason.UDP_BAD_CHECKSUM


def test_pluggable_handlers(endpoint: GuestEndpoint) -> None:
    """Handlers registered per EtherType, IP protocol, UDP port and UDP default."""
    seen: list[tuple[str, bytes, float]] = []

    def icmp(eth_src: bytes, packet: Ipv4Packet, now: float, out: list[bytes]) -> None:
        """A stand-in ICMP handler that answers."""
        seen.append(("icmp", bytes(packet.payload), now))
        out.append(b"icmp reply")

    def dns(eth_src: bytes, packet: Ipv4Packet, datagram: UdpDatagram, now: float,
            out: list[bytes]) -> None:
        """A stand-in DNS forwarder."""
        seen.append(("dns", bytes(datagram.payload), now))

    def any_udp(eth_src: bytes, packet: Ipv4Packet, datagram: UdpDatagram, now: float,
                out: list[bytes]) -> None:
        """A stand-in UDP flow handler that finds no flow."""
        raise PacketError(DropReason.UDP_PORT_UNHANDLED, f"no flow for {datagram.dst_port}")

    def ipv6(eth_src: bytes, payload: memoryview, now: float, out: list[bytes]) -> None:
        """A stand-in IPv6 handler."""
        seen.append(("ipv6", eth_src, now))

    endpoint.register_ip_protocol(1, icmp)
    endpoint.register_udp_port(53, dns)
    endpoint.set_udp_default(any_udp)
    endpoint.register_ethertype(0x86DD, ipv6)
    out: list[bytes] = []
    assert endpoint.handle_frame(memoryview(ip_frame(1, b"ping")), 7.0, out) is None
    assert out == [b"icmp reply"]
    frame = udp_frame(GUEST_IP, GATEWAY, 40000, 53, b"query", eth_dst=OUR_MAC)
    assert endpoint.handle_frame(memoryview(frame), 8.0, out) is None
    frame = udp_frame(GUEST_IP, GATEWAY, 40000, 5353, b"x", eth_dst=OUR_MAC)
    assert endpoint.handle_frame(memoryview(frame), 9.0, out) is DropReason.UDP_PORT_UNHANDLED
    frame = eth_frame(OUR_MAC, GUEST_MAC, 0x86DD, bytes(40))
    assert endpoint.handle_frame(memoryview(frame), 10.0, out) is None
    assert seen == [("icmp", b"ping", 7.0), ("dns", b"query", 8.0), ("ipv6", GUEST_MAC, 10.0)]
    endpoint.set_udp_default(None)
    assert verdict(endpoint, udp_frame(GUEST_IP, GATEWAY, 1, 9, b"", eth_dst=OUR_MAC)) is \
        DropReason.UDP_PORT_UNHANDLED


# --- fuzzing -----------------------------------------------------------------------------

def seed_frames() -> list[bytes]:
    """Valid frames of every kind the endpoint understands or names."""
    bcast = b"\xff" * 4
    dhcp = [dhcp_options((53, bytes((kind,))), (50, GUEST_IP), (54, GATEWAY), (55, b"\x01\x03"))
            for kind in (1, 3, 4, 7, 8)]
    dhcp.append(dhcp_options((52, b"\x03"), (53, b"\x03")))
    frames = [udp_frame(bytes(4), bcast, 68, 67, dhcp_message(options=o)) for o in dhcp]
    frames += [
        arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY),
        arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), GUEST_IP),
        ip_frame(1, b"\x08\0\0\0\0\0\0\0"),
        udp_frame(GUEST_IP, GATEWAY, 40000, 53, b"query", eth_dst=OUR_MAC),
        eth_frame(b"\x33\x33\0\0\0\x01", GUEST_MAC, 0x86DD, bytes(40)),
        udp6_frame(solicit()),
    ]
    return frames


def rewrap_dhcp(rng: random.Random, message: bytes) -> bytes:
    """Mutate a DHCP message and wrap it with valid IPv4/UDP checksums."""
    body = bytearray(message)
    for _ in range(rng.randrange(1, 6)):
        pos = rng.randrange(236, len(body)) if rng.random() < 0.8 else rng.randrange(len(body))
        body[pos] = rng.choice((0, 1, 3, 50, 52, 53, 54, 55, 255, rng.randrange(256)))
    if rng.random() < 0.3:
        body = body[:rng.randrange(len(body) + 1)]
    return udp_frame(bytes(4), b"\xff" * 4, 68, 67, bytes(body))


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """Flip, overwrite, truncate or extend a frame at random."""
    data = bytearray(frame)
    choice = rng.random()
    if choice < 0.4:
        for _ in range(rng.randrange(1, 8)):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
    elif choice < 0.6:
        pos = rng.randrange(len(data))
        data[pos:pos + 2] = struct.pack("!H", rng.choice((0, 1, 0xFFFF, rng.randrange(65536))))
    elif choice < 0.8:
        del data[rng.randrange(len(data) + 1):]
    else:
        data += rng.randbytes(rng.randrange(1, 64))
    return bytes(data)


def check_reply(frame: bytes, guest_mac: bytes | None) -> None:
    """Every frame we emit is a well-formed ARP, DHCP or DHCPv6 reply to the guest's (learned) MAC."""
    assert frame[:6] == guest_mac and frame[6:12] == OUR_MAC
    if frame[12:14] == b"\x08\x06":
        assert decode_arp_frame(frame).op == 2
    elif frame[12:14] == b"\x86\xdd":
        packet = Ether(frame)
        assert bytes(packet) == frame and packet[UDP].sport == 547 and packet[UDP].dport == 546
        message = packet[UDP].payload
        assert isinstance(message, (DHCP6_Advertise, DHCP6_Reply))
    else:
        assert decode_dhcp_reply(frame).op == 2


def test_fuzz_never_raises(endpoint: GuestEndpoint) -> None:
    """A few thousand mutated frames: always a verdict, only well-formed replies."""
    rng = random.Random(0x5EED)
    seeds = seed_frames()
    messages = [frame[42:] for frame in seeds[:6]]
    verdicts: dict[DropReason | None, int] = {}
    for i in range(4000):
        if i % 4 == 0:
            frame = rewrap_dhcp(rng, rng.choice(messages))
        elif i % 4 == 3:
            frame = (rng.choice((OUR_MAC, BROADCAST_MAC)) + GUEST_MAC
                     + rng.choice((b"\x08\x00", b"\x08\x06", rng.randbytes(2)))
                     + rng.randbytes(rng.randrange(0, 80)))
        else:
            frame = mutate(rng, rng.choice(seeds))
        out: list[bytes] = []
        result = endpoint.handle_frame(memoryview(frame), float(i), out)
        assert result is None or isinstance(result, DropReason)
        if result is not None:
            assert out == []
        for reply in out:
            check_reply(reply, endpoint.guest_mac)
            assert endpoint.guest_mac == frame[6:12]
        verdicts[result] = verdicts.get(result, 0) + 1
    assert sum(endpoint.drops.values()) == 4000 - verdicts.get(None, 0)
    # The loop reached deep into every layer, not just the Ethernet checks.
    for reason in (DropReason.DHCP_MALFORMED, DropReason.DHCP_IGNORED, DropReason.ARP_MALFORMED,
                   DropReason.IPV4_BAD_CHECKSUM, DropReason.UDP_BAD_CHECKSUM,
                   DropReason.NOT_FOR_US, DropReason.TRUNCATED):
        assert verdicts.get(reason, 0) > 0, reason
    assert verdicts.get(None, 0) > 100


@pytest.mark.parametrize(("services", "dhcp", "ns", "rs"), [
    (Service.ALL, None, None, None),
    (Service.ALL & ~Service.DHCP, DropReason.UDP_PORT_UNHANDLED, None, None),
    (Service.ALL & ~Service.RA, None, None, DropReason.NDP_IGNORED),
    (Service.ALL & ~(Service.NDP | Service.RA), None, DropReason.ICMPV6_IGNORED, DropReason.ICMPV6_IGNORED),
])
def test_services_turned_off(services: Service, dhcp: DropReason | None, ns: DropReason | None,
                             rs: DropReason | None) -> None:
    """--no-dhcp, --no-ra, --no-ndp: the service's requests are dropped (counted), the others answered."""

    ep = GuestEndpoint(GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2",
                                   address6="2001:db8::15"), services)
    for frame, expected in ((DhcpTestClient().discover(), dhcp), (ns_frame(ip6("2001:db8::1")), ns),
                            (rs_frame(), rs)):
        out: list[bytes] = []
        assert ep.handle_frame(memoryview(frame), 0.0, out) == expected
        assert bool(out) == (expected is None)


# --- UDP over IPv6 and DHCPv6 ---------------------------------------------------------------------

def test_udp6_port_dispatch() -> None:
    """IPv6 UDP is parsed once by the endpoint, then dispatched by port, else to the default handler."""
    ep = make_endpoint6()
    seen: list[tuple[str, int, bytes, bool]] = []

    def mdns(eth_src: bytes, packet: Ipv6Packet, datagram: UdpDatagram, now: float, out: list[bytes]) -> None:
        """A stand-in port handler."""
        seen.append(("mdns", datagram.dst_port, bytes(datagram.payload), packet.csum_partial))

    def flows(eth_src: bytes, packet: Ipv6Packet, datagram: UdpDatagram, now: float, out: list[bytes]) -> None:
        """A stand-in flow handler (the worker's UDP flows)."""
        seen.append(("flows", datagram.dst_port, bytes(datagram.payload), packet.csum_partial))
        out.append(b"flow reply")

    to_host = {"src": "2001:db8::15", "dst": "2001:db8::1", "eth_dst": "9a:55:9a:55:9a:55", "sport": 40000}
    assert ep.handle_frame(memoryview(udp6_frame(b"q", dport=53, **to_host)), 0.0, []) is \
        DropReason.UDP_PORT_UNHANDLED
    ep.register_udp6_port(5353, mdns)
    ep.set_udp6_default(flows)
    out: list[bytes] = []
    assert ep.handle_frame(memoryview(udp6_frame(b"m", dport=5353, **to_host)), 1.0, out) is None
    assert ep.handle_frame(memoryview(udp6_frame(b"q", dport=53, **to_host)), 2.0, out) is None
    assert out == [b"flow reply"]
    bad = bytearray(udp6_frame(b"q", dport=53, **to_host))
    bad[60] ^= 0x20  # the UDP checksum
    assert ep.handle_frame(memoryview(bytes(bad)), 3.0, []) is DropReason.UDP_BAD_CHECKSUM
    assert ep.handle_frame(memoryview(bytes(bad)), 3.0, [], csum_partial=True) is None
    assert seen == [("mdns", 5353, b"m", False), ("flows", 53, b"q", False), ("flows", 53, b"q", True)]
    truncated = bytearray(udp6_frame(b"q", dport=53, **to_host))
    truncated[58:60] = b"\x00\x04"  # UDP length under 8
    assert ep.handle_frame(memoryview(bytes(truncated)), 4.0, []) is DropReason.UDP_MALFORMED
    # DHCPv6 keeps its port whatever the default handler is.
    result: list[bytes] = []
    assert ep.handle_frame(memoryview(udp6_frame(solicit())), 5.0, result) is None
    assert isinstance(dhcpv6_decode(result[0])[0], DHCP6_Advertise)
    ep.set_udp6_default(None)
    assert ep.handle_frame(memoryview(udp6_frame(b"q", dport=53, **to_host)), 6.0, []) is \
        DropReason.UDP_PORT_UNHANDLED


@pytest.mark.parametrize("dhcpv6_on", [True, False])
def test_dhcpv6_service(dhcpv6_on: bool) -> None:
    """Service.DHCPV6 (part of ALL): port 547 served and RAs with M and O; off: neither."""
    assert Service.DHCPV6 in Service.ALL and Service.DHCPV6 == 8
    ep = make_endpoint6(Service.ALL if dhcpv6_on else Service.ALL & ~Service.DHCPV6)
    out: list[bytes] = []
    verdict6 = ep.handle_frame(memoryview(udp6_frame(solicit())), 0.0, out)
    assert verdict6 == (None if dhcpv6_on else DropReason.UDP_PORT_UNHANDLED)
    assert ep.handle_frame(memoryview(rs_frame()), 0.0, out) is None
    ra = Ether(out[-1])[ICMPv6ND_RA]
    assert (ra.M, ra.O) == ((1, 1) if dhcpv6_on else (0, 0))


@pytest.mark.parametrize("services", [Service.ALL & ~Service.IPV4, Service.ALL & ~Service.IPV6])
def test_one_family_only(services: Service) -> None:
    """-6 / -4: ARP and IPv4, or IPv6 (NDP included), are dropped as ETHERTYPE_UNHANDLED; the other family
    is answered."""
    ep = GuestEndpoint(GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2",
                                   address6="2001:db8::15"), services)
    v4_on = bool(services & Service.IPV4)
    arp = arp_frame(1, GUEST_MAC, ip("10.0.2.15"), bytes(6), ip("10.0.2.2"))
    for frame, on in ((arp, v4_on), (DhcpTestClient().discover(), v4_on),
                      (ns_frame(ip6("2001:db8::1")), not v4_on), (rs_frame(), not v4_on)):
        out: list[bytes] = []
        assert ep.handle_frame(memoryview(frame), 0.0, out) == (None if on else DropReason.ETHERTYPE_UNHANDLED)
        assert bool(out) == on
