"""Property-based fuzzing of every sans-IO codec a peer reaches: any bytes give a result or a layer error.

Theory of operation
-------------------
hypothesis feeds each parser two kinds of input: arbitrary bytes, and valid
messages (templates built by the test libraries and scapy-checked elsewhere)
with random mutations (bytes overwritten, truncated, extended), which reach
the deep parts of each parser that random bytes rarely get past.  The
property is the contract of the layer: a result, or the layer's own error
(:class:`~shardswitch.net.drop.PacketError` for guest packets,
:class:`~shardswitch.vhost.wire.VhostProtocolError` for front-end messages),
never anything else.  The whole guest-facing endpoint (ARP, DHCP, NDP,
DHCPv6, IPv4/IPv6/UDP/ICMP parsing) is fuzzed through
:meth:`~shardswitch.net.endpoint.GuestEndpoint.handle_frame`, which must
never raise at all; it has no flow handlers plugged in, so nothing fuzzed
here opens a socket or sends anything.

Examples: ``SHARDSWITCH_FUZZ_EXAMPLES`` (default 10,000, what CI runs) for
the endpoint and for the vhost-user decoders, a quarter of it for the
codec-level properties; ``make fuzz`` runs 200,000.  No example database is
written, and the runs are derandomized (the same inputs every time).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardswitch.net import arp, dhcp, dhcpv6, eth, icmp, icmpv6, ipv4, ipv6, tcp, udp
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.endpoint import GuestEndpoint
from shardswitch.net.params import GuestParams
from shardswitch.vhost import wire
from shardswitch.vhost.wire import VhostProtocolError
from tests.net.fuzzkit import TEMPLATES
from tests.net.net_testlib import OUR_MAC

EXAMPLES = int(os.environ.get("SHARDSWITCH_FUZZ_EXAMPLES", "10000"))
#: The two interfaces a peer reaches (guest frames, vhost-user messages) get EXAMPLES inputs each; the codecs
#: below them, which the endpoint property reaches as well, a quarter as many again on their own.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
FUZZ_PART = settings(FUZZ, max_examples=max(1, EXAMPLES // 4))

PARAMS = GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2", dns=["10.0.2.3"],
                     search=["example.com"], address6="2001:db8::15", dns6=["2001:db8::53"])


@st.composite
def mutated(draw: st.DrawFn, templates: tuple[bytes, ...] = TEMPLATES) -> bytes:
    """A template with a few bytes overwritten, then maybe truncated or extended."""
    data = bytearray(draw(st.sampled_from(templates)))
    for _ in range(draw(st.integers(0, 6))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    if cut is not None:
        del data[cut:]
    return bytes(data) + draw(st.binary(max_size=16))


FRAMES = st.one_of(mutated(), st.binary(max_size=1600))


@FUZZ
@given(frame=FRAMES, csum_partial=st.booleans())
def test_endpoint_never_raises(frame: bytes, csum_partial: bool) -> None:
    """Any frame: consumed (replies are complete frames) or dropped with a reason."""
    endpoint = ENDPOINT
    out: list[bytes] = []
    result = endpoint.handle_frame(memoryview(frame), 1000.0, out, csum_partial)
    assert result is None or isinstance(result, DropReason)
    if result is not None:
        assert out == []
    for reply in out:
        assert len(reply) >= eth.ETH_HLEN and reply[6:12] == OUR_MAC


ENDPOINT = GuestEndpoint(PARAMS)


def _layer(data: bytes) -> None:
    """Run every IP-level codec over ``data`` after the Ethernet header; only PacketError may come out."""
    view = memoryview(data)[eth.ETH_HLEN:]
    for parse in (ipv4.parse, ipv6.parse):
        try:
            packet = parse(view)
        except PacketError:
            continue
        if isinstance(packet, ipv4.Ipv4Packet):
            codecs = (lambda: udp.parse(packet), lambda: tcp.parse4(packet), lambda: icmp.parse_echo(packet))
        else:
            codecs = (lambda: udp.parse6(packet), lambda: tcp.parse6(packet), lambda: icmpv6.parse(packet))
        for codec in codecs:
            try:
                codec()
            except PacketError:
                pass


@FUZZ_PART
@given(frame=FRAMES)
def test_ip_layer_codecs(frame: bytes) -> None:
    """IPv4, IPv6, UDP, TCP, ICMP and ICMPv6 parsers: a result or PacketError."""
    _layer(frame)


@FUZZ_PART
@given(payload=st.one_of(st.binary(max_size=700), mutated((TEMPLATES[1][42:], TEMPLATES[7][62:]))))
def test_dhcp_and_dhcpv6_messages(payload: bytes) -> None:
    """DHCP and DHCPv6 message parsers and the ARP parser: a result or PacketError."""
    for parse in (dhcp.parse_message, dhcpv6.parse_message, arp.parse):
        try:
            parse(memoryview(payload))
        except PacketError:
            pass


MESSAGES = st.one_of(
    st.binary(max_size=wire.HEADER.size + 64),
    st.builds(lambda req, flags, payload: wire.HEADER.pack(req, flags, len(payload)) + payload,
              st.integers(0, 64), st.sampled_from([0, 1, 5, 8, 9, 0x10, 0xFFFFFFFF]),
              st.binary(max_size=400)),
)


@FUZZ
@given(message=MESSAGES)
def test_vhost_wire_decoders(message: bytes) -> None:
    """Every vhost-user decoder: a result or VhostProtocolError."""
    try:
        header = wire.decode_header(message[:wire.HEADER.size])
    except VhostProtocolError:
        header = None
    payload = message[wire.HEADER.size:]
    if header is not None:
        assert header.size <= wire.MAX_PAYLOAD
    for decode in (lambda: wire.decode_u64("X", payload), lambda: wire.decode_vring_state("X", payload),
                   lambda: wire.decode_vring_addr(payload), lambda: wire.decode_mem_table(payload),
                   lambda: wire.decode_single_region("X", payload)):
        try:
            decode()
        except VhostProtocolError:
            pass
