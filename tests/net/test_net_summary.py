"""The --trace summary of a frame: independent frames (scapy) in, one line out, never an exception."""

from __future__ import annotations

import logging

from hypothesis import given, settings
from hypothesis import strategies as st

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6, ICMPv6ND_RS  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402

from shardswitch.net.summary import describe  # noqa: E402


def test_tcp_udp_icmp_arp_lines() -> None:
    """Addresses, ports, TCP flags, ICMP types and ARP operations, with the frame's length."""
    syn = bytes(Ether() / IP(src="10.0.2.15", dst="192.0.2.1") / TCP(sport=40000, dport=80, flags="S"))
    assert describe(syn) == f"IPv4 10.0.2.15:40000 > 192.0.2.1:80 TCP [S] len {len(syn)}"
    synack = bytes(Ether() / IP() / TCP(flags="SA"))
    assert "TCP [SA]" in describe(synack)
    dns = bytes(Ether() / IPv6(src="2001:db8::2", dst="2001:db8::1") / UDP(sport=5353, dport=53))
    assert describe(dns) == f"IPv6 2001:db8::2:5353 > 2001:db8::1:53 UDP len {len(dns)}"
    assert "ICMP type 8" in describe(bytes(Ether() / IP() / ICMP()))
    assert "ICMPv6 type 133" in describe(bytes(Ether() / IPv6() / ICMPv6ND_RS()))
    arp = bytes(Ether() / ARP(op=1, psrc="10.0.2.15", pdst="10.0.2.2"))
    assert describe(arp) == f"ARP request 10.0.2.2 tell 10.0.2.15 len {len(arp)}"


def test_short_and_unknown_frames() -> None:
    """A runt, a truncated IP header and an unknown EtherType are described, not refused."""
    assert describe(b"\x00" * 5) == "runt frame len 5"
    assert describe(bytes(Ether(type=0x0800)) + b"\x45\x00") == "IPv4 truncated len 16"
    assert describe(bytes(Ether(type=0x88CC)) + b"x") == "ethertype 0x88cc len 15"


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_any_bytes_give_a_line(data: bytes) -> None:
    """Whatever the guest sends, the trace line is built without an exception."""
    assert isinstance(describe(data), str)
