"""Address translation between the guest and the host (Forwarding): both directions, DNS, the guest's address."""

from __future__ import annotations

import pytest

import socket

from shardswitch.ipc import ForwardSetup
from shardswitch.net import inany, ipv6
from shardswitch.net.params import GuestParams
from shardswitch.shm.table import FlowTable
from shardswitch.worker.fwd import Forwarding
from tests.worker.standin import StandInWorker

A = inany.from_str
MAPPED = ("10.0.2.2", "fe80::1")
GUEST_MAC = bytes.fromhex("525400123456")


def forwarding(mapped: tuple[str, ...] = MAPPED, address6: str = "",
               **setup: object) -> tuple[StandInWorker, Forwarding]:
    """A Forwarding for a guest at 10.0.2.15 (and ``address6``); ``setup``: more ForwardSetup fields."""
    w = StandInWorker(GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2", address6=address6))
    forward = ForwardSetup(map_host_loopback=mapped, **setup)  # type: ignore[arg-type]
    return w, Forwarding(w, forward)


@pytest.mark.parametrize(("dst", "port", "expected"), [
    ("10.0.2.2", 80, ("127.0.0.1", 80)),
    ("fe80::1", 22, ("::1", 22)),
    ("192.0.2.7", 443, ("192.0.2.7", 443)),
    ("2001:db8::7", 443, ("2001:db8::7", 443)),
])
def test_to_host_maps_the_loopback(dst: str, port: int, expected: tuple[str, int]) -> None:
    """Mapped addresses mean the host's loopback of their family; others go where the guest sent them."""
    _w, fwd = forwarding()
    target, tport = fwd.to_host(A(dst), port)
    assert (inany.to_str(target), tport) == expected


def test_dns_forward_pairs() -> None:
    """Port 53 (and 853) of a forwarding address goes to its paired resolver (any family: both gateways to one IPv4
    stub); other ports of a mapped gateway still mean the host's loopback; a bad pair is skipped."""
    pairs = (("10.0.2.2", "127.0.0.53"), ("fe80::1", "127.0.0.53"), ("10.0.2.53", "192.0.2.1"),
             ("10.0.2.54", "not an address"))
    _w, fwd = forwarding(dns_forward=pairs)
    assert fwd.to_host(A("fe80::1"), 53) == (A("127.0.0.53"), 53)
    assert fwd.to_host(A("10.0.2.2"), 53) == (A("127.0.0.53"), 53)
    assert fwd.to_host(A("fe80::1"), 80) == (A("::1"), 80)
    assert fwd.to_host(A("10.0.2.53"), 53) == (A("192.0.2.1"), 53)
    assert fwd.to_host(A("10.0.2.53"), 853) == (A("192.0.2.1"), 853)       # DNS over TLS, as passt
    assert fwd.to_host(A("10.0.2.53"), 80) == (A("10.0.2.53"), 80)
    assert fwd.to_host(A("10.0.2.54"), 53) == (A("10.0.2.54"), 53)


def test_map_guest_addr_both_ways() -> None:
    """--map-guest-addr: the guest reaches the host's own (shadowed) address through it, and a host client
    on that address appears as it; without it such a client appears as the gateway, never as the guest."""
    _w, fwd = forwarding(address6="2001:db8::15", map_guest_addr="192.0.2.1")
    assert fwd.to_host(A("192.0.2.1"), 8080) == (A("10.0.2.15"), 8080)
    assert fwd.seen_from(A("10.0.2.15")) == A("192.0.2.1")
    assert fwd.seen_from(A("2001:db8::15")) == A("fe80::1")
    _w, six = forwarding(address6="2001:db8::15", map_guest_addr="2001:db8::99")
    assert six.to_host(A("2001:db8::99"), 22) == (A("2001:db8::15"), 22)
    assert six.seen_from(A("2001:db8::15")) == A("2001:db8::99")
    assert six.seen_from(A("10.0.2.15")) == A("10.0.2.2")


def test_bind_outbound() -> None:
    """-o binds the source address of its family; loopback targets are never bound."""
    _w, fwd = forwarding(outbound=("127.0.0.5",))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fwd.bind_outbound(sock, A("192.0.2.7"))
        assert sock.getsockname()[0] == "127.0.0.5"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fwd.bind_outbound(sock, A("127.0.0.1"))
        assert sock.getsockname() == ("0.0.0.0", 0)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        fwd.bind_outbound(sock, A("2001:db8::7"))
        assert sock.getsockname()[1] == 0


def test_seen_from() -> None:
    """A loopback client appears as the first mapped address of its family; others as themselves."""
    _w, fwd = forwarding()
    assert fwd.seen_from(A("127.0.0.1")) == A("10.0.2.2")
    assert fwd.seen_from(A("::ffff:127.0.0.1")) == A("10.0.2.2")
    assert fwd.seen_from(A("::1")) == A("fe80::1")
    assert fwd.seen_from(A("192.0.2.9")) == A("192.0.2.9")
    _w, v4_only = forwarding(mapped=("10.0.2.2",))
    assert v4_only.seen_from(A("::1")) is None


def test_guest_address() -> None:
    """IPv4: the lease. IPv6: the global address it used, never replaced by a link-local one; else its MAC's."""
    w, fwd = forwarding()
    assert fwd.guest_address(True) == A("10.0.2.15")
    assert fwd.guest_address(False) is None
    w.endpoint.guest_mac = GUEST_MAC
    assert fwd.guest_address(False) == ipv6.link_local_from_mac(GUEST_MAC)
    fwd.learn_guest(A("fe80::5054:ff:fe12:3456"))
    fwd.learn_guest(A("2001:db8::15"))
    fwd.learn_guest(A("fe80::5054:ff:fe12:3456"))
    fwd.learn_guest(A("10.0.2.15"))
    fwd.learn_guest(A("::"))
    fwd.learn_guest(A("ff02::1"))
    assert fwd.guest_address(False) == A("2001:db8::15")
    _w, configured = forwarding(address6="2001:db8::99")
    assert configured.guest_address(False) == A("2001:db8::99")


def test_guest_address_learnt_on_one_worker_serves_all(table: FlowTable) -> None:
    """The global IPv6 address one worker learns is what another worker targets (through the shared table,
    before its own configured one); link-local sources are never published."""
    params = GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2", address6="2001:db8::2")
    w0, w1 = StandInWorker(params), StandInWorker(params)
    fwd0, fwd1 = Forwarding(w0, ForwardSetup(), table), Forwarding(w1, ForwardSetup(), table)
    assert fwd1.guest_address(False) == A("2001:db8::2")
    fwd0.learn_guest(A("fe80::5054:ff:fe12:3456"))
    assert fwd1.guest_address(False) == A("2001:db8::2")
    fwd0.learn_guest(A("2001:db8::5054:ff:fe12:3456"))
    assert fwd1.guest_address(False) == A("2001:db8::5054:ff:fe12:3456")
    assert fwd0.guest_address(True) == A("10.0.2.15")


@pytest.mark.parametrize(("client", "target", "reason"), [
    ("127.0.0.1", "127.0.0.5", "FLOW_DST_LOOPBACK"),
    ("127.0.0.1", "224.0.0.9", "FLOW_DST_MULTICAST"),
    ("127.0.0.1", "10.0.2.255", "FLOW_DST_MULTICAST"),        # the guest subnet's directed broadcast
    ("127.0.0.1", "0.0.0.0", "FLOW_DST_UNSPECIFIED"),
    ("127.0.0.1", "10.0.2.2", "FLOW_DST_DENIED"),             # the gateway: the switch's own address
    ("192.0.2.9", "10.0.2.53", "FLOW_DST_DENIED"),            # the DNS forwarding address
    ("::1", "192.0.2.5", "FLOW_DST_DENIED"),                  # a client of the other family
])
def test_a_forwarded_flows_target_passes_the_flow_policy(client: str, target: str, reason: str) -> None:
    """A rule's target address inside the guest (-t 0.0.0.0/5000:192.0.2.5/6000) is screened by the flow
    policy for every forwarded flow: no loopback, multicast, broadcast or unspecified address, none of the
    switch's own guest-side addresses, and the client's family only."""
    from shardswitch.net.drop import PacketError

    _w, fwd = forwarding(dns_forward=(("10.0.2.53", "127.0.0.53"),))
    with pytest.raises(PacketError) as refused:
        fwd.inbound(A(client), A(target))
    assert refused.value.reason.name == reason


def test_a_forwarded_flow_goes_to_the_rules_target() -> None:
    """With a target the flow goes there, from where the client appears (the gateway for the host's
    loopback); without one, to the guest's own address."""
    _w, fwd = forwarding(address6="2001:db8::15")
    assert fwd.inbound(A("127.0.0.1"), A("192.0.2.5")) == (A("10.0.2.2"), A("192.0.2.5"))
    assert fwd.inbound(A("192.0.2.9"), A("10.0.2.16")) == (A("192.0.2.9"), A("10.0.2.16"))
    assert fwd.inbound(A("2001:db8::9"), A("2001:db8::5")) == (A("2001:db8::9"), A("2001:db8::5"))
    assert fwd.inbound(A("127.0.0.1")) == (A("10.0.2.2"), A("10.0.2.15"))
