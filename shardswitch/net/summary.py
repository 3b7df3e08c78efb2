"""One line about a frame, for ``--trace``: what passt's trace messages tell, from the bytes alone.

Theory of operation.  :func:`describe` reads only fixed headers at fixed
offsets, each read bounded by the frame's length, and never raises: a frame
too short or malformed for the next header is described as far as it goes
("IPv4 truncated").  It does not validate (the endpoint does, and counts
what it drops); it tells the operator what passed by::

    IPv4 10.0.2.15:40000 > 93.184.216.34:80 TCP [S] len 74
    IPv6 fe80::1 > ff02::1 ICMPv6 type 134 len 110
    ARP request 10.0.2.2 tell 10.0.2.15 len 42

Pure: bytes in, text out; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from .eth import ETH_HLEN, EtherType
from .ipv4 import IpProto
from .ipv6 import NextHeader

_ETHERTYPE: Final = struct.Struct("!H")
_PORTS: Final = struct.Struct("!HH")
#: TCP flag letters, lowest bit first (FIN, SYN, RST, PSH, ACK, URG).
_TCP_FLAGS: Final = "FSRPAU"
_IPV4_HLEN: Final = 20
_IPV6_HLEN: Final = 40
_ARP_LEN: Final = 28


def describe(frame: bytes | bytearray | memoryview) -> str:
    """A one-line summary of an Ethernet frame (never raises)."""
    data = memoryview(frame).cast("B")
    size = len(data)
    if size < ETH_HLEN:
        return f"runt frame len {size}"
    (ethertype,) = _ETHERTYPE.unpack_from(data, 12)
    if ethertype == EtherType.IPV4:
        text = _ipv4(data[ETH_HLEN:])
    elif ethertype == EtherType.IPV6:
        text = _ipv6(data[ETH_HLEN:])
    elif ethertype == EtherType.ARP:
        text = _arp(data[ETH_HLEN:])
    else:
        text = f"ethertype {ethertype:#06x}"
    return f"{text} len {size}"


def _ipv4(packet: memoryview) -> str:
    """IPv4 addresses, protocol and what follows."""
    if len(packet) < _IPV4_HLEN:
        return "IPv4 truncated"
    hlen = (packet[0] & 0x0F) * 4
    src = ipaddress.IPv4Address(bytes(packet[12:16]))
    dst = ipaddress.IPv4Address(bytes(packet[16:20]))
    return _transport("IPv4", str(src), str(dst), packet[9], packet[hlen:] if hlen >= _IPV4_HLEN else packet[:0])


def _ipv6(packet: memoryview) -> str:
    """IPv6 addresses, next header (extension headers are not followed) and what follows."""
    if len(packet) < _IPV6_HLEN:
        return "IPv6 truncated"
    src = ipaddress.IPv6Address(bytes(packet[8:24]))
    dst = ipaddress.IPv6Address(bytes(packet[24:40]))
    return _transport("IPv6", str(src), str(dst), packet[6], packet[_IPV6_HLEN:])


def _transport(family: str, src: str, dst: str, proto: int, payload: memoryview) -> str:
    """The transport part: ports and TCP flags, or the ICMP type."""
    if proto in (IpProto.TCP, IpProto.UDP) and len(payload) >= _PORTS.size:
        sport, dport = _PORTS.unpack_from(payload)
        name = "TCP" if proto == IpProto.TCP else "UDP"
        flags = ""
        if proto == IpProto.TCP and len(payload) >= 14:
            bits = payload[13]
            flags = " [" + "".join(c for i, c in enumerate(_TCP_FLAGS) if bits >> i & 1) + "]"
        return f"{family} {src}:{sport} > {dst}:{dport} {name}{flags}"
    if proto in (IpProto.ICMP, NextHeader.ICMPV6) and len(payload) >= 1:
        return f"{family} {src} > {dst} {'ICMP' if proto == IpProto.ICMP else 'ICMPv6'} type {payload[0]}"
    return f"{family} {src} > {dst} protocol {proto}"


def _arp(packet: memoryview) -> str:
    """ARP operation and addresses (IPv4 over Ethernet)."""
    if len(packet) < _ARP_LEN:
        return "ARP truncated"
    sender = ipaddress.IPv4Address(bytes(packet[14:18]))
    target = ipaddress.IPv4Address(bytes(packet[24:28]))
    if packet[7] == 1:
        return f"ARP request {target} tell {sender}"
    return f"ARP reply {sender} is-at {bytes(packet[8:14]).hex(':')}"
