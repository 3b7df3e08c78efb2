"""inany: one 16-byte address type for IPv4 (IPv4-mapped) and IPv6."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from shardswitch.net import inany

ADDRESSES = ["0.0.0.0", "10.0.2.15", "127.0.0.1", "127.255.0.3", "192.0.2.255", "255.255.255.255",
             "::", "::1", "fe80::1", "2001:db8::15", "ff02::1", "2001:db8::ffff:0:1"]


@pytest.mark.parametrize("text", ADDRESSES)
def test_round_trips(text: str) -> None:
    """Text, packed and integer forms agree with the ipaddress module, and come back unchanged."""
    ip = ipaddress.ip_address(text)
    addr = inany.from_str(text)
    assert len(addr) == 16 and inany.from_packed(ip.packed) == addr
    assert inany.packed(addr) == ip.packed and inany.to_str(addr) == str(ip)
    assert inany.is_v4(addr) == (ip.version == 4)
    assert inany.family(addr) == (socket.AF_INET if ip.version == 4 else socket.AF_INET6)
    assert inany.is_loopback(addr) == ip.is_loopback
    assert inany.sockaddr(addr, 53) == (str(ip), 53)
    if ip.version == 4:
        assert inany.from_v4(int(ip)) == addr and inany.v4_int(addr) == int(ip)
        assert addr == inany.V4_PREFIX + ip.packed
        assert inany.loopback_like(addr) == inany.LOOPBACK4
    else:
        assert addr == ip.packed and inany.loopback_like(addr) == inany.LOOPBACK6


def test_mapped_text_and_zones() -> None:
    """IPv4-mapped text is IPv4; a zone suffix is ignored."""
    assert inany.from_str("::ffff:1.2.3.4") == inany.from_str("1.2.3.4")
    assert inany.is_loopback(inany.from_str("::ffff:127.0.0.1"))
    assert inany.from_str("fe80::1%eth0") == inany.from_str("fe80::1")


@pytest.mark.parametrize("text", ["", "10.0.2", "10.0.2.256", "gateway", "fe80:::1", "1.2.3.4/24"])
def test_bad_text(text: str) -> None:
    """Anything but an address is an AddressError."""
    with pytest.raises(inany.AddressError):
        inany.from_str(text)


@pytest.mark.parametrize("size", [0, 3, 5, 15, 17])
def test_bad_lengths(size: int) -> None:
    """Only 4 and 16 bytes are addresses."""
    with pytest.raises(inany.AddressError):
        inany.from_packed(bytes(size))
