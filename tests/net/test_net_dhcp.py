"""DHCPv4 server: a test client runs against the endpoint, back to back."""

from __future__ import annotations

import struct

import pytest

from shardswitch.net import DropReason, GuestEndpoint, GuestParams, ParamsError
from shardswitch.net.dhcp import encode_domain_search
from tests.net.net_testlib import (GUEST_MAC, OUR_MAC, ClientState, DhcpReply, DhcpTestClient,
                                   decode_dhcp_reply, decode_dns_names, dhcp_message,
                                   dhcp_options, ip, udp_frame)

GUEST_IP, GATEWAY, BCAST = ip("10.0.2.15"), ip("10.0.2.2"), b"\xff" * 4
SEARCH = ["example.com", "corp.example.com", "lab.test"]


def make_endpoint(**changes: object) -> GuestEndpoint:
    """An endpoint with DNS servers and search domains, with ``changes`` applied."""
    fields: dict[str, object] = {"address": "10.0.2.15", "prefix_len": 24, "gateway": "10.0.2.2",
                                 "dns": ["10.0.2.3", "192.0.2.53"], "search": SEARCH,
                                 "lease_time": 7200, "mtu": 65520}
    fields.update(changes)
    return GuestEndpoint(GuestParams(**fields))  # type: ignore[arg-type]


@pytest.fixture
def endpoint() -> GuestEndpoint:
    """The default endpoint."""
    return make_endpoint()


def exchange(endpoint: GuestEndpoint, frame: bytes) -> list[bytes]:
    """Feed one frame that must be consumed; return the replies."""
    out: list[bytes] = []
    assert endpoint.handle_frame(memoryview(frame), 12.5, out) is None
    return out


def verdict(endpoint: GuestEndpoint, frame: bytes) -> DropReason | None:
    """Feed one frame; return the verdict (and check nothing is sent on drops)."""
    out: list[bytes] = []
    result = endpoint.handle_frame(memoryview(frame), 0.0, out)
    assert out == [] or result is None
    return result


def request(options: bytes, **fields: object) -> bytes:
    """A client message frame (broadcast, from 0.0.0.0:68 to port 67)."""
    return udp_frame(bytes(4), BCAST, 68, 67, dhcp_message(options=options, **fields))  # type: ignore[arg-type]


def single_reply(endpoint: GuestEndpoint, frame: bytes) -> DhcpReply:
    """The one decoded reply to ``frame``."""
    out = exchange(endpoint, frame)
    assert len(out) == 1
    return decode_dhcp_reply(out[0])


def state(client: DhcpTestClient) -> ClientState:
    """The client's state (read through a call, so type checkers do not pin it)."""
    return client.state


def check_config_options(reply: DhcpReply, *, lease: bool = True) -> None:
    """Every configuration option the default endpoint hands out."""
    opts = reply.options
    assert opts[54] == GATEWAY
    assert opts[1] == ip("255.255.255.0")
    assert opts[3] == GATEWAY
    assert opts[6] == ip("10.0.2.3") + ip("192.0.2.53")
    assert decode_dns_names(opts[119]) == SEARCH
    assert opts[26] == struct.pack("!H", 65520)
    assert 121 not in opts, "gateway is on link"
    if lease:
        assert opts[51] == struct.pack("!I", 7200)
    else:
        assert 51 not in opts
    assert reply.udp.eth_src == OUR_MAC and reply.udp.ip_src == GATEWAY


def test_discover_request_ack_and_renew(endpoint: GuestEndpoint) -> None:
    """The whole client life cycle; replies unicast to yiaddr, then to ciaddr."""
    client = DhcpTestClient()
    (offer_frame,) = exchange(endpoint, client.discover())
    request_frame = client.receive(offer_frame)
    assert state(client) is ClientState.REQUESTING and request_frame is not None
    offer = client.offer
    assert offer is not None and offer.message_type == 2
    assert offer.yiaddr == GUEST_IP and offer.ciaddr == bytes(4) and offer.flags == 0
    assert offer.udp.ip_dst == GUEST_IP, "no broadcast flag: unicast to yiaddr"
    check_config_options(offer)

    (ack_frame,) = exchange(endpoint, request_frame)
    assert client.receive(ack_frame) is None
    assert state(client) is ClientState.BOUND and client.address == GUEST_IP
    assert client.ack is not None and client.ack.message_type == 5
    assert client.ack.udp.ip_dst == GUEST_IP
    check_config_options(client.ack)

    (renew_ack,) = exchange(endpoint, client.renew())
    assert client.receive(renew_ack) is None and state(client) is ClientState.BOUND
    assert client.ack.udp.ip_dst == GUEST_IP and client.ack.ciaddr == GUEST_IP
    assert client.log == ["selecting: 2", "requesting: 5", "renewing: 5"]
    assert endpoint.guest_mac == GUEST_MAC
    assert not any(endpoint.drops.values())


def test_broadcast_flag_gets_broadcast_replies(endpoint: GuestEndpoint) -> None:
    """With the broadcast flag, OFFER and ACK go to 255.255.255.255, flag copied."""
    client = DhcpTestClient(broadcast=True)
    (offer_frame,) = exchange(endpoint, client.discover())
    next_frame = client.receive(offer_frame)
    assert next_frame is not None
    (ack_frame,) = exchange(endpoint, next_frame)
    client.receive(ack_frame)
    assert client.offer is not None and client.ack is not None
    for reply in (client.offer, client.ack):
        assert reply.udp.ip_dst == BCAST and reply.flags == 0x8000
        assert reply.udp.eth_dst == GUEST_MAC


def test_stateless_across_workers() -> None:
    """DISCOVER answered by one worker, REQUEST by another: still ACKed."""
    first, second = make_endpoint(), make_endpoint()
    client = DhcpTestClient()
    (offer,) = exchange(first, client.discover())
    next_frame = client.receive(offer)
    assert next_frame is not None
    (ack,) = exchange(second, next_frame)
    client.receive(ack)
    assert state(client) is ClientState.BOUND


def check_nak(reply: DhcpReply) -> None:
    """A NAK: broadcast, no address, only message type and server id."""
    assert reply.message_type == 6
    assert reply.udp.ip_dst == BCAST and reply.yiaddr == bytes(4) and reply.ciaddr == bytes(4)
    assert set(reply.options) == {53, 54} and reply.options[54] == GATEWAY


@pytest.mark.parametrize("options", [
    dhcp_options((53, b"\x03"), (50, ip("10.0.2.16")), (54, GATEWAY)),
    dhcp_options((53, b"\x03"), (50, GUEST_IP), (54, ip("10.0.2.1"))),
    dhcp_options((53, b"\x03")),
])
def test_request_nak(endpoint: GuestEndpoint, options: bytes) -> None:
    """Wrong requested address, wrong server id, or nothing requested: NAK."""
    check_nak(single_reply(endpoint, request(options)))


def test_nak_sends_client_back_to_init(endpoint: GuestEndpoint) -> None:
    """A renewing client asking for a stale address is NAKed and restarts."""
    client = DhcpTestClient(state=ClientState.BOUND, address=ip("10.0.2.77"), server_id=GATEWAY,
                            server_mac=OUR_MAC)
    (nak,) = exchange(endpoint, client.renew())
    assert client.receive(nak) is None
    assert state(client) is ClientState.INIT and client.naks == 1


def test_renew_with_wrong_ciaddr_nak(endpoint: GuestEndpoint) -> None:
    """ciaddr stands in for option 50 in RENEWING; a wrong one is NAKed."""
    check_nak(single_reply(endpoint, request(dhcp_options((53, b"\x03")),
                                             ciaddr=ip("10.0.2.16"))))


def test_inform(endpoint: GuestEndpoint) -> None:
    """INFORM: ACK with configuration, no yiaddr, no lease; unicast to ciaddr."""
    reply = single_reply(endpoint, request(dhcp_options((53, b"\x08")), ciaddr=GUEST_IP))
    assert reply.message_type == 5 and reply.yiaddr == bytes(4) and reply.ciaddr == GUEST_IP
    assert reply.udp.ip_dst == GUEST_IP
    check_config_options(reply, lease=False)
    no_ciaddr = single_reply(endpoint, request(dhcp_options((53, b"\x08"))))
    assert no_ciaddr.udp.ip_dst == BCAST


@pytest.mark.parametrize("kind", [4, 7])
def test_release_and_decline_consumed(endpoint: GuestEndpoint, kind: int) -> None:
    """RELEASE and DECLINE get no answer and are not drops."""
    assert exchange(endpoint, request(dhcp_options((53, bytes((kind,)))), ciaddr=GUEST_IP)) == []


def test_rapid_commit(endpoint: GuestEndpoint) -> None:
    """DISCOVER with Rapid Commit gets an ACK carrying an empty option 80."""
    reply = single_reply(endpoint, request(dhcp_options((53, b"\x01"), (80, b""))))
    assert reply.message_type == 5 and reply.options[80] == b"" and reply.yiaddr == GUEST_IP
    check_config_options(reply)


def test_gateway_off_link_gets_classless_route() -> None:
    """A gateway outside the subnet: option 121 routes to it and through it."""
    endpoint = make_endpoint(address="192.168.10.5", prefix_len=32, gateway="192.168.1.1",
                             dns=[], search=[])
    reply = single_reply(endpoint, request(dhcp_options((53, b"\x01"))))
    gw = ip("192.168.1.1")
    assert reply.options[121] == b"\x20" + gw + bytes(4) + b"\x00" + gw
    assert reply.options[1] == b"\xff" * 4 and reply.yiaddr == ip("192.168.10.5")
    assert 6 not in reply.options and 119 not in reply.options


def test_search_domain_encoding_rfc3397_example() -> None:
    """The example of RFC 3397 section 2, byte for byte."""
    assert encode_domain_search(["eng.apple.com", "marketing.apple.com"]) == (
        b"\x03eng\x05apple\x03com\x00\x09marketing\xc0\x04")
    names = ["example.com", "corp.example.com", "example.com", "a.b.c", "c"]
    encoded = encode_domain_search(names)
    assert decode_dns_names(encoded) == names
    assert encoded == (b"\x07example\x03com\x00" b"\x04corp\xc0\x00" b"\xc0\x00"
                       b"\x01a\x01b\x01c\x00" b"\xc0\x1a")


def test_long_search_list_split_and_trimmed() -> None:
    """Option 119 over 255 bytes is split; what cannot fit in 576 bytes is left out."""
    names = [f"{chr(97 + i) * 48}.x{i}" for i in range(6)]  # 53 bytes encoded each
    endpoint = make_endpoint(dns=[], search=names)
    assert endpoint.dhcp.search_dropped == (names[5],)
    reply = single_reply(endpoint, request(dhcp_options((53, b"\x01"))))
    assert reply.option_order.count(119) == 2
    assert decode_dns_names(reply.options[119]) == names[:5]
    assert len(reply.udp.payload) <= 548


def test_option_syntax_variants(endpoint: GuestEndpoint) -> None:
    """Pads, split options (RFC 3396), a missing end option, and option overload."""
    padded = b"\x00\x00" + dhcp_options((53, b"\x03"), (50, GUEST_IP[:2]), (50, GUEST_IP[2:]))
    assert single_reply(endpoint, request(padded)).message_type == 5
    no_end = dhcp_options((53, b"\x01"))[:-1]
    assert single_reply(endpoint, request(no_end, pad_to=0)).message_type == 2
    in_file = dhcp_options((53, b"\x03"), (50, GUEST_IP))
    for overload, where in ((1, "file"), (2, "sname"), (3, "file")):
        msg = request(dhcp_options((52, bytes((overload,)))), **{where: in_file})
        assert single_reply(endpoint, msg).message_type == 5
    both = request(dhcp_options((52, b"\x03"), (53, b"\x03")),
                   file=dhcp_options((50, GUEST_IP[:1])), sname=dhcp_options((50, GUEST_IP[1:])))
    assert single_reply(endpoint, both).message_type == 5
    ignored = request(dhcp_options((53, b"\x03"), (50, GUEST_IP)), file=dhcp_options((53, b"\x07")))
    assert single_reply(endpoint, ignored).message_type == 5, "file is not scanned without 52"


@pytest.mark.parametrize(("frame", "reason"), [
    (request(b"\x35\x01\x01\x37\x05\x01", pad_to=0), DropReason.DHCP_MALFORMED),
    (request(b"\x35\x01\x01\x37", pad_to=0), DropReason.DHCP_MALFORMED),
    (request(dhcp_options((53, b"\x01"), (52, b"\x04"))), DropReason.DHCP_MALFORMED),
    (request(dhcp_options((53, b"\x01"), (52, b"\x01\x01"))), DropReason.DHCP_MALFORMED),
    (request(dhcp_options((52, b"\x01")), file=b"\x35\x01\x01\x37\xff" + bytes(120) + b"\x37\x04"),
     DropReason.DHCP_MALFORMED),
    (request(dhcp_options((53, b"\x01\x01"))), DropReason.DHCP_MALFORMED),
    (request(dhcp_options((53, b"\x03"), (50, b"\x0a\x00\x02"))), DropReason.DHCP_MALFORMED),
    (request(dhcp_options((53, b"\x03"), (54, GATEWAY + b"\x00"))), DropReason.DHCP_MALFORMED),
    (request(dhcp_options((53, b"\x01")), htype=6), DropReason.DHCP_MALFORMED),
    (request(dhcp_options((53, b"\x01")), hlen=16), DropReason.DHCP_MALFORMED),
    (udp_frame(bytes(4), BCAST, 68, 67, dhcp_message(options=b"")[:239]),
     DropReason.DHCP_MALFORMED),
    (request(dhcp_options((53, b"\x01")), op=2), DropReason.DHCP_IGNORED),
    (request(dhcp_options((53, b"\x01")), cookie=0), DropReason.DHCP_IGNORED),
    (request(dhcp_options((12, b"host"))), DropReason.DHCP_IGNORED),
    (request(dhcp_options((53, b"\x02"))), DropReason.DHCP_IGNORED),
    (request(dhcp_options((53, b"\x05"))), DropReason.DHCP_IGNORED),
    (request(dhcp_options((53, b"\x63"))), DropReason.DHCP_IGNORED),
])
def test_bad_messages(endpoint: GuestEndpoint, frame: bytes, reason: DropReason) -> None:
    """Malformed messages and messages we do not answer give their drop reason."""
    assert verdict(endpoint, frame) is reason
    assert endpoint.drops[reason] == 1


def test_client_port_is_not_served(endpoint: GuestEndpoint) -> None:
    """Only port 67 is DHCP."""
    frame = udp_frame(bytes(4), BCAST, 67, 68, dhcp_message(options=dhcp_options((53, b"\x01"))))
    assert verdict(endpoint, frame) is DropReason.UDP_PORT_UNHANDLED


def test_message_size_limits(endpoint: GuestEndpoint) -> None:
    """Requests up to 1472 bytes (a 1500-byte MTU) are served; longer ones are not."""
    options = dhcp_options((53, b"\x01"))
    assert single_reply(endpoint, request(options, pad_to=1472)).message_type == 2
    assert verdict(endpoint, request(options, pad_to=1473)) is DropReason.DHCP_MALFORMED


def test_too_many_dns_servers_rejected() -> None:
    """Mandatory options that cannot fit a 576-byte reply are a configuration error."""
    with pytest.raises(ParamsError):
        make_endpoint(dns=[f"10.0.3.{i}" for i in range(1, 70)])
    assert make_endpoint(dns=[f"10.0.3.{i}" for i in range(1, 60)], search=[]).dhcp.search_dropped \
        == ()


def test_hostname_fqdn_and_no_mtu() -> None:
    """-H: option 12 with the name as given; --fqdn: option 81 with flags E, RCODEs 255 and the name in wire
    format (as passt); -m 0: no option 26.  Without them none of the three is sent."""
    endpoint = make_endpoint(hostname="vm1", fqdn="vm1.example.org.", offer_mtu=False)
    offer = single_reply(endpoint, DhcpTestClient().discover())
    assert offer.options[12] == b"vm1"
    assert offer.options[81][:3] == b"\x04\xff\xff"
    assert decode_dns_names(offer.options[81][3:]) == ["vm1.example.org"]
    assert 26 not in offer.options
    plain = single_reply(make_endpoint(), DhcpTestClient().discover())
    assert 12 not in plain.options and 81 not in plain.options and 26 in plain.options


def test_bad_hostname_refused() -> None:
    """A host name that is not printable ASCII is a configuration error, not something sent."""
    with pytest.raises(ParamsError, match="host name"):
        make_endpoint(hostname="vm\x001")
