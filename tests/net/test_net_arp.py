"""Proxy ARP through the endpoint: who gets answered, who does not."""

from __future__ import annotations

import struct

import pytest

from shardswitch.net import DropReason, GuestEndpoint, GuestParams
from tests.net.net_testlib import (BROADCAST_MAC, GUEST_MAC, OUR_MAC, arp_frame,
                                   decode_arp_frame, eth_frame, ip)

GUEST_IP, GATEWAY = ip("10.0.2.15"), ip("10.0.2.2")


@pytest.fixture
def endpoint() -> GuestEndpoint:
    """An endpoint with the usual slirp-like addressing."""
    return GuestEndpoint(GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2"))


def run(endpoint: GuestEndpoint, frame: bytes) -> tuple[DropReason | None, list[bytes]]:
    """Feed one frame; return the verdict and the replies."""
    out: list[bytes] = []
    verdict = endpoint.handle_frame(memoryview(frame), 0.0, out)
    if verdict is not None:
        assert out == []
    return verdict, out


@pytest.mark.parametrize("target", ["10.0.2.2", "10.0.2.3", "10.0.2.99", "192.0.2.1"])
def test_request_answered_with_our_mac(endpoint: GuestEndpoint, target: str) -> None:
    """The gateway and any other address resolve to our MAC."""
    verdict, out = run(endpoint, arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), ip(target)))
    assert verdict is None and len(out) == 1
    assert len(out[0]) == 42, "replies are not padded"
    reply = decode_arp_frame(out[0])
    assert (reply.eth_dst, reply.eth_src, reply.op) == (GUEST_MAC, OUR_MAC, 2)
    assert (reply.sha, reply.spa) == (OUR_MAC, ip(target))
    assert (reply.tha, reply.tpa) == (GUEST_MAC, GUEST_IP)
    assert endpoint.guest_mac == GUEST_MAC


def test_unicast_refresh_and_padded_request(endpoint: GuestEndpoint) -> None:
    """A request unicast to our MAC, and one padded to 60 bytes, are answered."""
    frame = arp_frame(1, GUEST_MAC, GUEST_IP, OUR_MAC, GATEWAY, eth_dst=OUR_MAC)
    assert run(endpoint, frame)[0] is None and len(run(endpoint, frame)[1]) == 1
    padded = arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY) + bytes(18)
    assert len(run(endpoint, padded)[1]) == 1


def test_probe_answered(endpoint: GuestEndpoint) -> None:
    """A probe from 0.0.0.0 for another address gets an answer (to 0.0.0.0)."""
    verdict, out = run(endpoint, arp_frame(1, GUEST_MAC, bytes(4), bytes(6), ip("10.0.2.7")))
    assert verdict is None
    reply = decode_arp_frame(out[0])
    assert (reply.spa, reply.tpa, reply.tha) == (ip("10.0.2.7"), bytes(4), GUEST_MAC)


@pytest.mark.parametrize("frame", [
    arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), GUEST_IP),           # gratuitous request
    arp_frame(1, GUEST_MAC, ip("10.0.2.9"), bytes(6), ip("10.0.2.9")),  # other announcement
    arp_frame(1, GUEST_MAC, bytes(4), bytes(6), GUEST_IP),           # DAD probe of own address
    arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), GUEST_IP, eth_dst=OUR_MAC),
])
def test_consumed_without_reply(endpoint: GuestEndpoint, frame: bytes) -> None:
    """Announcements and requests for the guest's own address: consumed, silent."""
    assert run(endpoint, frame) == (None, [])


@pytest.mark.parametrize("op", [2, 3, 4, 0, 0xFFFF])
def test_non_requests_ignored(endpoint: GuestEndpoint, op: int) -> None:
    """Replies (gratuitous ones included) and other operations are counted drops."""
    assert run(endpoint, arp_frame(op, GUEST_MAC, GUEST_IP, BROADCAST_MAC, GUEST_IP)) == \
        (DropReason.ARP_IGNORED, [])
    assert endpoint.drops[DropReason.ARP_IGNORED] == 1


@pytest.mark.parametrize("fields", [(6, 0x0800, 6, 4), (1, 0x86DD, 6, 4), (1, 0x0800, 8, 4),
                                    (1, 0x0800, 6, 16)])
def test_malformed_header(endpoint: GuestEndpoint, fields: tuple[int, int, int, int]) -> None:
    """Only Ethernet/IPv4 ARP is understood."""
    body = struct.pack("!HHBBH6s4s6s4s", *fields, 1, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY)
    frame = eth_frame(BROADCAST_MAC, GUEST_MAC, 0x0806, body)
    assert run(endpoint, frame) == (DropReason.ARP_MALFORMED, [])


def test_truncated_arp(endpoint: GuestEndpoint) -> None:
    """Every truncation of a request is malformed (or truncated below 14 bytes)."""
    frame = arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY)
    for cut in range(len(frame)):
        expected = DropReason.TRUNCATED if cut < 14 else DropReason.ARP_MALFORMED
        assert run(endpoint, frame[:cut])[0] is expected


def test_not_for_us_and_bad_source(endpoint: GuestEndpoint) -> None:
    """Unicast to another MAC, or from a group/zero/our MAC, is dropped."""
    other = bytes.fromhex("525400999999")
    assert run(endpoint, arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY,
                                   eth_dst=other))[0] is DropReason.NOT_FOR_US
    for src in (BROADCAST_MAC, bytes(6), OUR_MAC, bytes.fromhex("333300000001")):
        frame = arp_frame(1, GUEST_MAC, GUEST_IP, bytes(6), GATEWAY, eth_src=src)
        assert run(endpoint, frame)[0] is DropReason.ETH_BAD_SOURCE
    assert endpoint.guest_mac == GUEST_MAC, "bad sources are not learned"
