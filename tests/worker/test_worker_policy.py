"""The flow policy and the one place that applies it (Forwarding.target): what a guest's new flow may address."""

from __future__ import annotations

import pytest

from shardswitch.ipc import ForwardSetup
from shardswitch.net import inany
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.params import GuestParams
from shardswitch.shm.layout import FlowSide, FlowType, Pif
from shardswitch.worker.fwd import Forwarding
from shardswitch.worker.policy import FlowPolicy, PolicyError, parse_prefix
from tests.worker.standin import StandInWorker

A = inany.from_str
GUEST4, GUEST6 = "10.0.2.15", "2001:db8::15"


def forwarding(**setup: object) -> Forwarding:
    """The Forwarding of a guest at 10.0.2.15/24 and 2001:db8::15, the gateways mapped unless ``setup`` says."""
    setup.setdefault("map_host_loopback", ("10.0.2.2", "fe80::1"))
    w = StandInWorker(GuestParams(address=GUEST4, prefix_len=24, gateway="10.0.2.2", address6=GUEST6))
    return Forwarding(w, ForwardSetup(**setup))  # type: ignore[arg-type]


def side(dst: str, port: int = 80, src: str | None = None) -> FlowSide:
    """The guest side of a flow from the guest (of ``dst``'s family) to ``dst``:``port``."""
    if src is None:
        src = GUEST4 if inany.is_v4(A(dst)) else GUEST6
    return FlowSide(Pif.GUEST, A(src), 40000, A(dst), port)


def refused(fwd: Forwarding, flow_side: FlowSide, ftype: FlowType = FlowType.TCP) -> DropReason | None:
    """The reason ``fwd`` refuses the flow for, None when it lets it go."""
    try:
        fwd.target(ftype, flow_side)
    except PacketError as err:
        return err.reason
    return None


@pytest.mark.parametrize(("dst", "reason"), [
    ("192.0.2.7", None), ("2001:db8::7", None),
    ("127.0.0.1", DropReason.FLOW_DST_LOOPBACK), ("127.1.2.3", DropReason.FLOW_DST_LOOPBACK),
    ("::1", DropReason.FLOW_DST_LOOPBACK),
    ("0.0.0.0", DropReason.FLOW_DST_UNSPECIFIED), ("0.1.2.3", DropReason.FLOW_DST_UNSPECIFIED),
    ("::", DropReason.FLOW_DST_UNSPECIFIED),
    ("224.0.0.251", DropReason.FLOW_DST_MULTICAST), ("255.255.255.255", DropReason.FLOW_DST_MULTICAST),
    ("10.0.2.255", DropReason.FLOW_DST_MULTICAST), ("240.0.0.1", DropReason.FLOW_DST_MULTICAST),
    ("ff02::fb", DropReason.FLOW_DST_MULTICAST),
    ("169.254.169.254", DropReason.FLOW_DST_LINK_LOCAL), ("169.254.0.1", DropReason.FLOW_DST_LINK_LOCAL),
    ("fe80::1234", DropReason.FLOW_DST_LINK_LOCAL), ("fd00:ec2::254", DropReason.FLOW_DST_LINK_LOCAL),
    ("100.100.100.200", DropReason.FLOW_DST_LINK_LOCAL),
])
def test_destinations(dst: str, reason: DropReason | None) -> None:
    """The default policy, with the gateways mapped: unicast destinations go, everything else has its reason."""
    assert refused(forwarding(), side(dst)) == reason


@pytest.mark.parametrize("ftype", [FlowType.TCP, FlowType.UDP, FlowType.PING4])
def test_no_map_gw_leaves_no_way_to_loopback(ftype: FlowType) -> None:
    """--no-map-gw: the host's loopback is out of reach by any address; the gateway is a host like others."""
    fwd = forwarding(map_host_loopback=())
    port = 0 if ftype == FlowType.PING4 else 80
    for dst in ("127.0.0.1", "0.0.0.0"):
        assert refused(fwd, side(dst, port), ftype) is not None, dst
    assert fwd.target(ftype, side("10.0.2.2", port)) == (A("10.0.2.2"), port)


def test_mapped_destinations_pass_the_deny_lists() -> None:
    """What the operator mapped goes where the operator said: the gateway (even link-local: the IPv6 router)
    to the host's loopback, a DNS forwarding address to its resolver, though deny lists cover them."""
    fwd = forwarding(deny=("10.0.0.0/8", "2001:db8::/32"), dns_forward=(("10.0.2.3", "127.0.0.53"),))
    assert fwd.target(FlowType.TCP, side("10.0.2.2")) == (A("127.0.0.1"), 80)
    assert fwd.target(FlowType.TCP, side("fe80::1")) == (A("::1"), 80)
    assert fwd.target(FlowType.UDP, side("10.0.2.3", 53)) == (A("127.0.0.53"), 53)
    assert refused(fwd, side("10.0.2.3", 80)) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("2001:db8:5::1")) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("192.0.2.1")) is None


def test_deny_list_and_allow_link_local() -> None:
    """--deny takes addresses and prefixes of both families (host bits allowed); --allow-link-local lifts the
    default refusal of link-local and metadata addresses, not the operator's own entries."""
    fwd = forwarding(deny=("192.0.2.7", "198.51.100.1/24", "2001:db8:1::/48"), allow_link_local=True)
    assert refused(fwd, side("192.0.2.7")) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("192.0.2.8")) is None
    assert refused(fwd, side("198.51.100.200")) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("2001:db8:1:ffff::1")) == DropReason.FLOW_DST_DENIED
    assert refused(fwd, side("2001:db8:2::1")) is None
    assert refused(fwd, side("169.254.169.254")) is None
    assert refused(fwd, side("fd00:ec2::254")) is None


def test_ports_and_sources() -> None:
    """TCP and UDP need a port; echo flows have none.  Sources must be the guest's unicast addresses."""
    fwd = forwarding()
    assert refused(fwd, side("192.0.2.7", 0)) == DropReason.FLOW_DST_UNSPECIFIED
    assert refused(fwd, side("192.0.2.7", 0), FlowType.UDP) == DropReason.FLOW_DST_UNSPECIFIED
    assert refused(fwd, side("192.0.2.7", 0), FlowType.PING4) is None
    for src in ("127.0.0.1", "0.0.0.0", "224.0.0.1", "::1", "::", "ff02::1"):
        dst = "192.0.2.7" if inany.is_v4(A(src)) else "2001:db8::7"
        assert refused(fwd, side(dst, src=src)) == DropReason.FLOW_BAD_SOURCE, src


def test_prefixes() -> None:
    """Prefix parsing: one 128-bit form for both families; garbage is a PolicyError."""
    assert parse_prefix("10.1.2.3/8") == parse_prefix("10.0.0.0/8")
    assert parse_prefix("0.0.0.0/0") != parse_prefix("::/0")
    for bad in ("", "10.0.0.0/33", "fe80::/129", "example.org", "1.2.3.4/x"):
        with pytest.raises(PolicyError):
            parse_prefix(bad)
    policy = FlowPolicy(("0.0.0.0/0",))
    with pytest.raises(PacketError):
        policy.egress(A("192.0.2.1"))
    policy.egress(A("2001:db8::1"))
