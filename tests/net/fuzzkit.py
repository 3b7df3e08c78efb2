"""Valid guest frames of every protocol the endpoint parses: the templates the fuzz tests mutate.

tests/net/test_net_fuzz.py mutates them for the codec-level properties,
tests/coordinator/test_fuzz_process.py to feed a running switch.
"""

from __future__ import annotations

import struct

from shardswitch.net import icmp
from tests.net.dhcpv6kit import raw_udp6_frame
from tests.net.ipv6kit import ip6
from tests.net.ndpkit import ns_frame, rs_frame
from tests.net.net_testlib import (BROADCAST_MAC, GUEST_MAC, OUR_MAC, DhcpTestClient, arp_frame, eth_frame, ip,
                                   ipv4_packet, udp_datagram)


def _tcp_syn4() -> bytes:
    """A TCP SYN from the guest over IPv4, with options."""
    header = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, (6 + 1) << 4, 0x02, 65535, 0, 0)
    options = bytes((2, 4, 5, 0xB4, 1, 3, 3, 7))
    return eth_frame(OUR_MAC, GUEST_MAC, 0x0800, ipv4_packet(ip("10.0.2.15"), ip("10.0.2.2"), 6, header + options))


def _echo4() -> bytes:
    """An ICMP echo request from the guest."""
    message = icmp.build_ping_request(7, 1, b"ping")
    return eth_frame(OUR_MAC, GUEST_MAC, 0x0800, ipv4_packet(ip("10.0.2.15"), ip("10.0.2.2"), 1, message))


#: Valid guest frames of every protocol the endpoint parses.
TEMPLATES = (
    arp_frame(1, GUEST_MAC, ip("10.0.2.15"), bytes(6), ip("10.0.2.2")),
    DhcpTestClient().discover(),
    eth_frame(BROADCAST_MAC, GUEST_MAC, 0x0800,
              ipv4_packet(ip("10.0.2.15"), ip("10.0.2.3"), 17,
                          udp_datagram(ip("10.0.2.15"), ip("10.0.2.3"), 5353, 53, b"query"))),
    _tcp_syn4(),
    _echo4(),
    ns_frame(ip6("2001:db8::1")),
    rs_frame(),
    raw_udp6_frame(bytes.fromhex("01123456") + struct.pack("!HH", 1, 10) + bytes.fromhex("00030001525400123456")
                   + struct.pack("!HHI", 3, 12, 7) + bytes(8) + struct.pack("!HH", 14, 0)),
)
