"""DHCPv6 client messages and reply decoding for the net and switch tests.

Client messages and frames are built with scapy (:func:`raw_udp6_frame`
without it, for fuzz loops), and replies are decoded by scapy, an
implementation independent of the code under test: :func:`decode` checks
every header field, that scapy decodes every option and re-encodes the frame
byte for byte, and that it agrees on the UDP checksum.
"""

from __future__ import annotations

import logging
import struct

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers import dhcp6  # noqa: E402
from scapy.layers.dhcp6 import (DUID_LLT, DHCP6OptClientId, DHCP6OptElapsedTime, DHCP6OptIA_NA,  # noqa: E402
                                DHCP6OptOptReq)
from scapy.layers.inet6 import UDP, IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import NoPayload, Packet, Raw  # noqa: E402

from shardswitch.net import GuestEndpoint, GuestParams, dhcpv6  # noqa: E402
from shardswitch.net.endpoint import Service  # noqa: E402
from tests.net.ipv6kit import GUEST_LL, OUR_LL, ip6, ipv6_packet  # noqa: E402
from tests.net.net_testlib import GUEST_MAC, eth_frame, rfc1071  # noqa: E402

GUEST6 = "2001:db8::15"
DNS6 = ["2001:db8::53", "fe80::53"]
SEARCH = ["example.com", "lab.example.org"]
ALL_DHCP = "ff02::1:2"
ALL_DHCP_MAC = "33:33:00:01:00:02"
#: The guest's DUID.
CLIENT_DUID = DUID_LLT(lladdr="52:54:00:12:34:56", timeval=0x12345678)
MAC_TEXT = "52:54:00:12:34:56"


def make_endpoint(services: Service = Service.ALL, **changes: object) -> GuestEndpoint:
    """An endpoint whose guest has IPv6 addressing, IPv6 DNS servers and search domains."""
    fields: dict[str, object] = {"address": "10.0.2.15", "prefix_len": 24, "gateway": "10.0.2.2",
                                 "address6": GUEST6, "dns6": DNS6, "search": SEARCH}
    fields.update(changes)
    return GuestEndpoint(GuestParams(**fields), services)  # type: ignore[arg-type]


def udp6_frame(payload: Packet | bytes, *, src: str = "fe80::5054:ff:fe12:3456", dst: str = ALL_DHCP,
               eth_dst: str | None = None, sport: int = 546, dport: int = 547) -> bytes:
    """A guest frame carrying ``payload`` over UDP/IPv6 (scapy fills lengths and checksum)."""
    if eth_dst is None:
        eth_dst = ALL_DHCP_MAC if dst == ALL_DHCP else "9a:55:9a:55:9a:55"
    body = payload if isinstance(payload, Packet) else Raw(load=payload)
    return bytes(Ether(src=MAC_TEXT, dst=eth_dst) / IPv6(src=src, dst=dst)
                 / UDP(sport=sport, dport=dport) / body)


def raw_udp6_frame(payload: bytes) -> bytes:
    """:func:`udp6_frame` to ff02::1:2 without scapy (fast, for the fuzz loop): reference checksum."""
    src, dst = GUEST_LL, ip6(ALL_DHCP)
    header = struct.pack("!HHHH", 546, 547, 8 + len(payload), 0)
    pseudo = src + dst + struct.pack("!I", 8 + len(payload)) + b"\0\0\0\x11"
    csum = rfc1071(pseudo + header + payload) or 0xFFFF
    datagram = header[:6] + struct.pack("!H", csum) + payload
    return eth_frame(bytes.fromhex("333300010002"), GUEST_MAC, 0x86DD, ipv6_packet(src, dst, 17, datagram))


def options(layer: Packet) -> list[Packet]:
    """The top-level options after a message layer (scapy chains them as payloads)."""
    found = []
    option = layer.payload
    while not isinstance(option, NoPayload):
        assert not isinstance(option, Raw), "scapy decoded every option"
        found.append(option)
        option = option.payload
    return found


def of(items: list[Packet], *classes: type[Packet]) -> list[Packet]:
    """The options of exactly these classes (scapy's Server Identifier subclasses the Client's)."""
    return [item for item in items if type(item) in classes]


def only(items: list[Packet], cls: type[Packet]) -> Packet:
    """The single option of class ``cls`` in ``items``."""
    matches = of(items, cls)
    assert len(matches) == 1, (cls.__name__, items)
    return matches[0]


def decode(frame: bytes, *, dst: bytes = GUEST_LL, src: bytes = OUR_LL) -> tuple[Packet, list[Packet]]:
    """Decode one reply frame with scapy and check every header field: (message layer, options)."""
    packet = Ether(frame)
    assert bytes(packet) == frame, "scapy re-encodes the frame identically"
    assert (packet.dst, packet.src, packet.type) == (MAC_TEXT, "9a:55:9a:55:9a:55", 0x86DD)
    ip_layer = packet[IPv6]
    assert (ip6(ip_layer.src), ip6(ip_layer.dst)) == (src, dst)
    assert (ip_layer.nh, ip_layer.hlim, ip_layer.plen) == (17, 64, len(frame) - 54)
    udp_layer = packet[UDP]
    assert (udp_layer.sport, udp_layer.dport, udp_layer.len) == (547, 546, len(frame) - 54)
    assert udp_layer.chksum != 0
    recomputed = packet.copy()
    recomputed[UDP].chksum = None
    assert Ether(bytes(recomputed))[UDP].chksum == udp_layer.chksum, "UDP checksum"
    assert len(frame) - 62 <= dhcpv6.MAX_REPLY_LEN
    message = udp_layer.payload
    return message, options(message)


def solicit(*extra: Packet, trid: int = 0x123456) -> Packet:
    """A Solicit with the client's DUID, an IA_NA (IAID 7), elapsed time and an ORO for DNS."""
    message = (dhcp6.DHCP6_Solicit(trid=trid) / DHCP6OptClientId(duid=CLIENT_DUID)
               / DHCP6OptIA_NA(iaid=7) / DHCP6OptElapsedTime() / DHCP6OptOptReq(reqopts=[23, 24]))
    for option in extra:
        message = message / option
    return message
