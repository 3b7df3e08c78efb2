"""DHCPv6 server: exchanges, RFC 8415 validation, malformed input, size limits, fuzz.

Client messages are built with scapy and every reply is decoded by scapy, an
implementation independent of the code under test: it must decode every
option (no raw leftovers), re-encode the frame byte for byte, and agree on
the UDP checksum it computes itself (the builders and the decoder are in
tests/net/dhcpv6kit.py).
"""

from __future__ import annotations

import logging
import random
import struct

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers import dhcp6  # noqa: E402
from scapy.layers.dhcp6 import (DUID_EN, DUID_LL, DHCP6OptClientId, DHCP6OptDNSDomains,  # noqa: E402
                                DHCP6OptDNSServers, DHCP6OptElapsedTime, DHCP6OptIA_NA, DHCP6OptIA_PD,
                                DHCP6OptIA_TA, DHCP6OptIAAddress, DHCP6OptPref, DHCP6OptRapidCommit,
                                DHCP6OptServerId, DHCP6OptStatusCode)
from scapy.packet import Packet  # noqa: E402

from shardswitch.net import GuestEndpoint, GuestParams, dhcpv6  # noqa: E402
from shardswitch.net.dhcpv6 import Dhcpv6Server  # noqa: E402
from shardswitch.net.drop import DropReason  # noqa: E402
from shardswitch.net.endpoint import Service  # noqa: E402
from shardswitch.net.params import ParamsError, resolve  # noqa: E402
from tests.net.dhcpv6kit import (ALL_DHCP, ALL_DHCP_MAC, CLIENT_DUID, DNS6, GUEST6, SEARCH, decode,  # noqa: E402
                                 make_endpoint, of, only, raw_udp6_frame, solicit, udp6_frame)
from tests.net.ipv6kit import ip6  # noqa: E402
from tests.net.net_testlib import OUR_MAC  # noqa: E402

INFINITY = 0xFFFFFFFF
#: Our expected DUID-LL.
SERVER_DUID = DUID_LL(lladdr="9a:55:9a:55:9a:55")


@pytest.fixture
def endpoint() -> GuestEndpoint:
    """The default endpoint."""
    return make_endpoint()


def exchange(endpoint: GuestEndpoint, frame: bytes, now: float = 0.0, *,
             csum_partial: bool = False) -> list[bytes] | DropReason:
    """Feed one frame: the replies, or the drop reason."""
    out: list[bytes] = []
    result = endpoint.handle_frame(memoryview(frame), now, out, csum_partial)
    if result is not None:
        assert out == []
        return result
    return out


def reply_to(endpoint: GuestEndpoint, message: Packet, **kwargs: object) -> tuple[Packet, list[Packet]]:
    """Send one client message to ff02::1:2, decode the single reply."""
    result = exchange(endpoint, udp6_frame(message, **kwargs))  # type: ignore[arg-type]
    assert isinstance(result, list) and len(result) == 1, result
    return decode(result[0])


def check_ids(opts: list[Packet], client: Packet | None = CLIENT_DUID) -> None:
    """Client Identifier echoed, our Server Identifier (DUID-LL of our MAC) present."""
    server = only(opts, DHCP6OptServerId)
    assert server.optlen == 10
    assert bytes(server.duid) == bytes(SERVER_DUID) == struct.pack("!HH6s", 3, 1, OUR_MAC)
    assert (server.duid.type, server.duid.hwtype, server.duid.lladdr) == (3, 1, "9a:55:9a:55:9a:55")
    if client is None:
        assert not of(opts, DHCP6OptClientId)
    else:
        assert bytes(only(opts, DHCP6OptClientId).duid) == bytes(client)


def check_config(opts: list[Packet], *, present: bool = True) -> None:
    """DNS servers (23) and search domains (24), or neither."""
    if not present:
        assert not of(opts, DHCP6OptDNSServers, DHCP6OptDNSDomains)
        return
    assert only(opts, DHCP6OptDNSServers).dnsservers == DNS6
    domains = only(opts, DHCP6OptDNSDomains)
    assert domains.dnsdomains == [name + "." for name in SEARCH]
    assert b"\xc0" not in bytes(domains), "no name compression in DHCPv6"


def check_lease(ia: Packet, iaid: int) -> None:
    """An IA_NA with ``iaid``, infinite T1/T2 and the guest's address with infinite lifetimes."""
    assert isinstance(ia, DHCP6OptIA_NA)
    assert (ia.iaid, ia.T1, ia.T2) == (iaid, INFINITY, INFINITY)
    assert len(ia.ianaopts) == 1
    address = ia.ianaopts[0]
    assert isinstance(address, DHCP6OptIAAddress)
    assert (address.addr, address.preflft, address.validlft) == (GUEST6, INFINITY, INFINITY)
    assert address.iaaddropts == []


def status_of(option: Packet) -> int:
    """The status code inside an IA or of a top-level Status Code option."""
    if isinstance(option, DHCP6OptStatusCode):
        return int(option.statuscode)
    inner = getattr(option, "ianaopts", None) or getattr(option, "iataopts", None) or option.iapdopt
    codes = [o for o in inner if isinstance(o, DHCP6OptStatusCode)]
    assert len(codes) == 1
    return int(codes[0].statuscode)


# --- the exchanges -----------------------------------------------------------------------------

def test_solicit_gets_advertise(endpoint: GuestEndpoint) -> None:
    """Solicit -> Advertise: ids, preference 255, the IA_NA with our address, DNS and domains."""
    message, opts = reply_to(endpoint, solicit())
    assert isinstance(message, dhcp6.DHCP6_Advertise)
    assert (message.msgtype, message.trid) == (2, 0x123456)
    check_ids(opts)
    assert only(opts, DHCP6OptPref).prefval == 255
    check_lease(only(opts, DHCP6OptIA_NA), 7)
    check_config(opts)
    assert not of(opts, DHCP6OptRapidCommit, DHCP6OptStatusCode)


def test_rapid_commit_gets_reply(endpoint: GuestEndpoint) -> None:
    """Solicit with Rapid Commit -> Reply with Rapid Commit and the lease."""
    message, opts = reply_to(endpoint, solicit(DHCP6OptRapidCommit(), trid=0xABCDEF))
    assert isinstance(message, dhcp6.DHCP6_Reply) and message.trid == 0xABCDEF
    assert only(opts, DHCP6OptRapidCommit).optlen == 0
    assert not of(opts, DHCP6OptPref)
    check_ids(opts)
    check_lease(only(opts, DHCP6OptIA_NA), 7)
    check_config(opts)


def test_full_client_life(endpoint: GuestEndpoint) -> None:
    """Solicit, Request, Renew, Rebind, Release, as a client does them with our answers."""
    advertise, opts = reply_to(endpoint, solicit(trid=1))
    server_id = only(opts, DHCP6OptServerId)
    address = only(opts, DHCP6OptIA_NA).ianaopts[0].addr
    lease = DHCP6OptIA_NA(iaid=7, ianaopts=[DHCP6OptIAAddress(addr=address)])
    base = (DHCP6OptClientId(duid=CLIENT_DUID), DHCP6OptServerId(duid=server_id.duid))
    for trid, kind, with_server in ((2, dhcp6.DHCP6_Request, True), (3, dhcp6.DHCP6_Renew, True),
                                    (4, dhcp6.DHCP6_Rebind, False)):
        msg = kind(trid=trid) / base[0]
        if with_server:
            msg = msg / base[1]
        message, opts = reply_to(endpoint, msg / lease / DHCP6OptElapsedTime())
        assert isinstance(message, dhcp6.DHCP6_Reply) and message.trid == trid
        check_ids(opts)
        check_lease(only(opts, DHCP6OptIA_NA), 7)
        check_config(opts)
    for trid, kind in ((5, dhcp6.DHCP6_Release), (6, dhcp6.DHCP6_Decline)):
        message, opts = reply_to(endpoint, kind(trid=trid) / base[0] / base[1] / lease)
        assert isinstance(message, dhcp6.DHCP6_Reply) and message.trid == trid
        check_ids(opts)
        assert status_of(only(opts, DHCP6OptStatusCode)) == 0
        assert not of(opts, DHCP6OptIA_NA)
        check_config(opts, present=False)


def test_unicast_to_our_link_local(endpoint: GuestEndpoint) -> None:
    """A request sent to our link-local address (and MAC) is answered as well."""
    message, _opts = reply_to(endpoint, solicit(), dst="fe80::9855:9aff:fe55:9a55")
    assert isinstance(message, dhcp6.DHCP6_Advertise)


def test_information_request(endpoint: GuestEndpoint) -> None:
    """Information-request -> Reply with DNS and domains, no IA; Client and Server ids optional."""
    message, opts = reply_to(endpoint, dhcp6.DHCP6_InfoRequest(trid=9) / DHCP6OptElapsedTime())
    assert isinstance(message, dhcp6.DHCP6_Reply) and message.trid == 9
    check_ids(opts, client=None)
    check_config(opts)
    assert not of(opts, DHCP6OptIA_NA)
    _message, opts = reply_to(endpoint, dhcp6.DHCP6_InfoRequest(trid=9) / DHCP6OptClientId(duid=CLIENT_DUID)
                              / DHCP6OptServerId(duid=SERVER_DUID))
    check_ids(opts)
    check_config(opts)


def test_without_dns_or_search() -> None:
    """No IPv6 DNS servers and no search domains: neither option."""
    _message, opts = reply_to(make_endpoint(dns6=[], search=[]), solicit())
    check_config(opts, present=False)
    check_lease(only(opts, DHCP6OptIA_NA), 7)


def test_several_ias_and_other_ia_types(endpoint: GuestEndpoint) -> None:
    """Each IA_NA gets the address under its own IAID; IA_TA NoAddrsAvail, IA_PD NoPrefixAvail."""
    _message, opts = reply_to(endpoint, solicit(DHCP6OptIA_NA(iaid=0x0BADCAFE), DHCP6OptIA_TA(iaid=7),
                                                DHCP6OptIA_PD(iaid=7)))
    ia_nas = of(opts, DHCP6OptIA_NA)
    assert [ia.iaid for ia in ia_nas] == [7, 0x0BADCAFE]
    for ia in ia_nas:
        check_lease(ia, ia.iaid)
    ia_ta = only(opts, DHCP6OptIA_TA)
    assert ia_ta.iaid == 7 and status_of(ia_ta) == 2
    ia_pd = only(opts, DHCP6OptIA_PD)
    assert (ia_pd.iaid, ia_pd.T1, ia_pd.T2) == (7, 0, 0) and status_of(ia_pd) == 6


def test_solicit_without_ia(endpoint: GuestEndpoint) -> None:
    """A Solicit with no IA (a stateless client) is advertised the configuration only."""
    message, opts = reply_to(endpoint, dhcp6.DHCP6_Solicit(trid=5) / DHCP6OptClientId(duid=CLIENT_DUID))
    assert isinstance(message, dhcp6.DHCP6_Advertise)
    assert not of(opts, DHCP6OptIA_NA)
    check_config(opts)


def test_renew_with_a_stale_address(endpoint: GuestEndpoint) -> None:
    """Renew/Rebind listing other addresses: ours with infinite lifetimes, the others with 0."""
    stale = DHCP6OptIA_NA(iaid=7, ianaopts=[DHCP6OptIAAddress(addr="2001:db8:1::99"),
                                           DHCP6OptIAAddress(addr=GUEST6)])
    for msg in (dhcp6.DHCP6_Renew() / DHCP6OptClientId(duid=CLIENT_DUID) / DHCP6OptServerId(duid=SERVER_DUID),
                dhcp6.DHCP6_Rebind() / DHCP6OptClientId(duid=CLIENT_DUID)):
        _message, opts = reply_to(endpoint, msg / stale)
        ia = only(opts, DHCP6OptIA_NA)
        assert (ia.T1, ia.T2) == (INFINITY, INFINITY)
        assert [(a.addr, a.preflft, a.validlft) for a in ia.ianaopts] == [
            (GUEST6, INFINITY, INFINITY), ("2001:db8:1::99", 0, 0)]


def test_request_with_an_address_off_link(endpoint: GuestEndpoint) -> None:
    """Request for an address outside our /64: NotOnLink in that IA; an on-link hint gets ours."""
    base = dhcp6.DHCP6_Request() / DHCP6OptClientId(duid=CLIENT_DUID) / DHCP6OptServerId(duid=SERVER_DUID)
    _message, opts = reply_to(endpoint, base / DHCP6OptIA_NA(
        iaid=7, ianaopts=[DHCP6OptIAAddress(addr="2001:db8:1::15")]))
    ia = only(opts, DHCP6OptIA_NA)
    assert (ia.T1, ia.T2) == (0, 0) and status_of(ia) == 4
    assert not of(ia.ianaopts, DHCP6OptIAAddress)
    _message, opts = reply_to(endpoint, base / DHCP6OptIA_NA(
        iaid=7, ianaopts=[DHCP6OptIAAddress(addr="2001:db8::77")]))
    check_lease(only(opts, DHCP6OptIA_NA), 7)


@pytest.mark.parametrize(("addresses", "status"), [
    ([GUEST6], 0), (["2001:db8::77"], 0), ([GUEST6, "2001:db8:1::1"], 4), (["fd00::1"], 4)])
def test_confirm(endpoint: GuestEndpoint, addresses: list[str], status: int) -> None:
    """Confirm: Success when every address is in our /64, NotOnLink otherwise; no IA, no DNS."""
    ia = DHCP6OptIA_NA(iaid=7, ianaopts=[DHCP6OptIAAddress(addr=a) for a in addresses])
    message, opts = reply_to(endpoint, dhcp6.DHCP6_Confirm(trid=77) / DHCP6OptClientId(duid=CLIENT_DUID) / ia)
    assert isinstance(message, dhcp6.DHCP6_Reply) and message.trid == 77
    check_ids(opts)
    assert status_of(only(opts, DHCP6OptStatusCode)) == status
    assert not of(opts, DHCP6OptIA_NA)
    check_config(opts, present=False)


def test_confirm_without_addresses_is_not_answered(endpoint: GuestEndpoint) -> None:
    """RFC 8415 18.3.3: a Confirm with no address gets no Reply."""
    frame = udp6_frame(dhcp6.DHCP6_Confirm() / DHCP6OptClientId(duid=CLIENT_DUID) / DHCP6OptIA_NA(iaid=7))
    assert exchange(endpoint, frame) is DropReason.DHCPV6_IGNORED


def test_stateless_across_workers() -> None:
    """Two endpoints (two workers) answer byte for byte the same."""
    frame = udp6_frame(solicit())
    assert exchange(make_endpoint(), frame) == exchange(make_endpoint(), frame)


def test_reply_source_follows_link_local_gateway() -> None:
    """With a link-local gateway6, replies come from it and requests to it are served."""
    ep = make_endpoint(gateway6="fe80::1")
    for dst in (ALL_DHCP, "fe80::1", "fe80::9855:9aff:fe55:9a55"):
        result = exchange(ep, udp6_frame(solicit(), dst=dst))
        assert isinstance(result, list)
        decode(result[0], src=ip6("fe80::1"))


def test_without_address6() -> None:
    """No IPv6 address to give: address requests are ignored, Information-request answered."""
    ep = make_endpoint(address6="")
    for msg in (solicit(), solicit(DHCP6OptRapidCommit()),
                dhcp6.DHCP6_Rebind() / DHCP6OptClientId(duid=CLIENT_DUID) / DHCP6OptIA_NA(iaid=1),
                dhcp6.DHCP6_Request() / DHCP6OptClientId(duid=CLIENT_DUID) / DHCP6OptServerId(duid=SERVER_DUID)):
        assert exchange(ep, udp6_frame(msg)) is DropReason.DHCPV6_IGNORED
    message, opts = reply_to(ep, dhcp6.DHCP6_InfoRequest())
    assert isinstance(message, dhcp6.DHCP6_Reply)
    check_config(opts)


def test_checksum_offload_and_bad_checksum(endpoint: GuestEndpoint) -> None:
    """A partial checksum (NEEDS_CSUM) is not verified; a wrong full one is UDP_BAD_CHECKSUM."""
    frame = bytearray(udp6_frame(solicit()))
    frame[60:62] = b"\x12\x34"
    assert exchange(endpoint, bytes(frame)) is DropReason.UDP_BAD_CHECKSUM
    result = exchange(endpoint, bytes(frame), csum_partial=True)
    assert isinstance(result, list) and len(result) == 1


def test_service_off() -> None:
    """Without Service.DHCPV6, port 547 has no handler (and nothing else takes it here)."""
    ep = make_endpoint(Service.ALL & ~Service.DHCPV6)
    assert exchange(ep, udp6_frame(solicit())) is DropReason.UDP_PORT_UNHANDLED


# --- validation ----------------------------------------------------------------------------------

CLIENT = DHCP6OptClientId(duid=CLIENT_DUID)
OURS = DHCP6OptServerId(duid=SERVER_DUID)
FOREIGN = DHCP6OptServerId(duid=DUID_EN(enterprisenum=32473, id=b"other"))
IA = DHCP6OptIA_NA(iaid=7)


@pytest.mark.parametrize(("message", "reason"), [
    # RFC 8415 section 16 rules.
    (dhcp6.DHCP6_Solicit() / IA, DropReason.DHCPV6_MALFORMED),                     # no client id
    (dhcp6.DHCP6_Solicit() / CLIENT / OURS / IA, DropReason.DHCPV6_MALFORMED),     # server id
    (dhcp6.DHCP6_Request() / CLIENT / IA, DropReason.DHCPV6_MALFORMED),            # no server id
    (dhcp6.DHCP6_Request() / OURS / IA, DropReason.DHCPV6_MALFORMED),              # no client id
    (dhcp6.DHCP6_Renew() / CLIENT / IA, DropReason.DHCPV6_MALFORMED),
    (dhcp6.DHCP6_Rebind() / CLIENT / OURS / IA, DropReason.DHCPV6_MALFORMED),
    (dhcp6.DHCP6_Confirm() / CLIENT / OURS / IA, DropReason.DHCPV6_MALFORMED),
    (dhcp6.DHCP6_Release() / CLIENT / IA, DropReason.DHCPV6_MALFORMED),
    (dhcp6.DHCP6_Decline() / OURS / IA, DropReason.DHCPV6_MALFORMED),
    (dhcp6.DHCP6_InfoRequest() / CLIENT / IA, DropReason.DHCPV6_MALFORMED),        # IA in info-request
    # Another server's identifier: the message is not for us.
    (dhcp6.DHCP6_Request() / CLIENT / FOREIGN / IA, DropReason.DHCPV6_IGNORED),
    (dhcp6.DHCP6_Renew() / CLIENT / FOREIGN / IA, DropReason.DHCPV6_IGNORED),
    (dhcp6.DHCP6_Release() / CLIENT / FOREIGN / IA, DropReason.DHCPV6_IGNORED),
    (dhcp6.DHCP6_Decline() / CLIENT / FOREIGN / IA, DropReason.DHCPV6_IGNORED),
    (dhcp6.DHCP6_InfoRequest() / CLIENT / FOREIGN, DropReason.DHCPV6_IGNORED),
    # Server and relay messages.
    (dhcp6.DHCP6_Advertise() / CLIENT / OURS, DropReason.DHCPV6_IGNORED),
    (dhcp6.DHCP6_Reply() / CLIENT / OURS, DropReason.DHCPV6_IGNORED),
    (dhcp6.DHCP6_Reconf() / CLIENT / OURS, DropReason.DHCPV6_IGNORED),
    (dhcp6.DHCP6_RelayForward(peeraddr="fe80::1") / dhcp6.DHCP6OptRelayMsg(message=dhcp6.DHCP6_Solicit() / CLIENT),
     DropReason.DHCPV6_IGNORED),
    # Duplicates.
    (dhcp6.DHCP6_Solicit() / CLIENT / CLIENT / IA, DropReason.DHCPV6_MALFORMED),
    (dhcp6.DHCP6_Request() / CLIENT / OURS / OURS, DropReason.DHCPV6_MALFORMED),
    (dhcp6.DHCP6_Solicit() / CLIENT / DHCP6OptRapidCommit() / DHCP6OptRapidCommit(), DropReason.DHCPV6_MALFORMED),
    (dhcp6.DHCP6_Solicit() / CLIENT / IA / DHCP6OptIA_NA(iaid=7), DropReason.DHCPV6_MALFORMED),  # same IAID
])
def test_rfc8415_validation(endpoint: GuestEndpoint, message: Packet, reason: DropReason) -> None:
    """Section 16 validation, other servers' messages, server-only types, duplicates."""
    assert exchange(endpoint, udp6_frame(message)) is reason


def test_same_iaid_in_different_ia_types_is_fine(endpoint: GuestEndpoint) -> None:
    """IAIDs are unique per IA type only."""
    assert isinstance(exchange(endpoint, udp6_frame(solicit(DHCP6OptIA_TA(iaid=7)))), list)


SOLICIT_HEAD = bytes(dhcp6.DHCP6_Solicit(trid=1))
CLIENT_RAW = bytes(CLIENT)


@pytest.mark.parametrize("payload", [
    b"",                                                     # no header
    b"\x01\x00\x00",                                         # header truncated
    SOLICIT_HEAD + CLIENT_RAW + b"\x00",                     # option header truncated (1 byte)
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x08\x00",             # option header truncated (3 bytes)
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x08\x00\x02\x00",     # option value past the end
    SOLICIT_HEAD + b"\x00\x01\x00\x40" + CLIENT_RAW[4:],     # client id length past the end
    SOLICIT_HEAD + b"\x00\x01\x00\x02\x00\x01",              # DUID of 2 bytes
    SOLICIT_HEAD + b"\x00\x01\x00\x83" + bytes(131),         # DUID of 131 bytes
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x0e\x00\x01\x00",     # rapid commit with a value
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x08\x00\x03\x00\x00\x00",  # elapsed time of 3 bytes
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x06\x00\x03\x00\x17\x00",  # odd option request
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x03\x00\x08" + bytes(8),   # IA_NA shorter than 12
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x04\x00\x02" + bytes(2),   # IA_TA shorter than 4
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x19\x00\x04" + bytes(4),   # IA_PD shorter than 12
    # IA_NA whose IAADDR runs past the IA (but not past the message).
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x03\x00\x14" + bytes(12) + b"\x00\x05\x00\x18" + bytes(4)
    + bytes(30),
    # IAADDR shorter than 24 bytes.
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x03\x00\x24" + bytes(12) + b"\x00\x05\x00\x14" + bytes(20),
    # IAADDR whose own option is truncated.
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x03\x00\x2a" + bytes(12) + b"\x00\x05\x00\x1a" + bytes(26),
    # IA_PD whose IAPREFIX is shorter than 25 bytes.
    SOLICIT_HEAD + CLIENT_RAW + b"\x00\x19\x00\x18" + bytes(12) + b"\x00\x1a\x00\x08" + bytes(8),
    SOLICIT_HEAD + CLIENT_RAW + bytes(dhcpv6.MAX_MESSAGE_LEN),  # over the size bound
])
def test_malformed_messages(endpoint: GuestEndpoint, payload: bytes) -> None:
    """Every option inside the message (and the IA), lengths as RFC 8415 says: else DHCPV6_MALFORMED."""
    assert exchange(endpoint, udp6_frame(payload)) is DropReason.DHCPV6_MALFORMED


def test_message_size_bound(endpoint: GuestEndpoint) -> None:
    """A message of exactly MAX_MESSAGE_LEN bytes (unknown option padding) is still served."""
    head = SOLICIT_HEAD + CLIENT_RAW
    filler = dhcpv6.MAX_MESSAGE_LEN - len(head) - 4
    message = head + struct.pack("!HH", 0x7777, filler) + bytes(filler)
    assert isinstance(exchange(endpoint, udp6_frame(message)), list)
    assert exchange(endpoint, udp6_frame(message + b"\0")) is DropReason.DHCPV6_MALFORMED


def test_unknown_options_skipped_even_repeated(endpoint: GuestEndpoint) -> None:
    """Options the server does not read may repeat and are skipped."""
    unknown = b"\x00\x10\x00\x04abcd"  # vendor class, which may repeat
    assert isinstance(exchange(endpoint, udp6_frame(bytes(solicit()) + unknown * 3)), list)


@pytest.mark.parametrize(("src", "dst"), [
    ("2001:db8::15", ALL_DHCP),              # not link-local
    ("fe80::5054:ff:fe12:3456", "ff02::1"),  # all-nodes
    ("fe80::5054:ff:fe12:3456", "fe80::77"), # some other link-local host
    ("fe80::5054:ff:fe12:3456", "ff05::1:3"),  # All_DHCP_Servers (site scope, relays only)
])
def test_addressing(endpoint: GuestEndpoint, src: str, dst: str) -> None:
    """Only link-local sources, to ff02::1:2 or to us."""
    frame = udp6_frame(solicit(), src=src, dst=dst, eth_dst=ALL_DHCP_MAC)
    assert exchange(endpoint, frame) is DropReason.DHCPV6_IGNORED


# --- sizes -------------------------------------------------------------------------------------

def test_too_many_dns_servers_rejected() -> None:
    """DNS servers that cannot fit a 1280-byte reply refuse to start; a fitting list works."""
    params = {"address": "10.0.2.15", "prefix_len": 24, "gateway": "10.0.2.2", "address6": GUEST6}
    with pytest.raises(ParamsError):
        Dhcpv6Server(resolve(GuestParams(**params, dns6=[f"2001:db8::{i:x}" for i in range(1, 61)])))
    ep = make_endpoint(dns6=[f"2001:db8::{i:x}" for i in range(1, 51)], search=[])
    _message, opts = reply_to(ep, solicit())
    assert len(only(opts, DHCP6OptDNSServers).dnsservers) == 50


def test_long_search_list_trimmed() -> None:
    """Search domains that would not fit are left out (and reported), the rest kept in order."""
    many = [f"{'x' * 60}.example{i}.com" for i in range(30)]
    ep = make_endpoint(search=many)
    dropped = ep.dhcpv6.search_dropped
    assert dropped and dropped == tuple(many[-len(dropped):])
    _message, opts = reply_to(ep, solicit(DHCP6OptRapidCommit(), DHCP6OptIA_NA(iaid=8)))
    assert only(opts, DHCP6OptDNSDomains).dnsdomains == [n + "." for n in many[:len(many) - len(dropped)]]


def test_longest_client_duid_fits(endpoint: GuestEndpoint) -> None:
    """A 130-byte client DUID is echoed whole."""
    duid = dhcp6.DUID_UUID(uuid="00112233-4455-6677-8899-aabbccddeeff")
    long_duid = bytes(duid)[:2] + bytes(range(128))
    frame = udp6_frame(SOLICIT_HEAD + struct.pack("!HH", 1, 130) + long_duid + bytes(IA))
    result = exchange(endpoint, frame)
    assert isinstance(result, list)
    _message, opts = decode(result[0])
    echoed = only(opts, DHCP6OptClientId)
    assert echoed.optlen == 130 and bytes(echoed)[4:134] == long_duid


def test_reply_too_big_is_refused(endpoint: GuestEndpoint) -> None:
    """Dozens of IAs would need a reply over 1280 bytes: refused."""
    message = solicit(*[DHCP6OptIA_NA(iaid=i) for i in range(100, 140)])
    assert exchange(endpoint, udp6_frame(message)) is DropReason.DHCPV6_MALFORMED


# --- fuzz --------------------------------------------------------------------------------------

def test_fuzz_never_raises(endpoint: GuestEndpoint) -> None:
    """Mutated messages (checksums redone): always a verdict, and only well-formed replies."""
    rng = random.Random(0xD6C6)
    seeds = [bytes(m) for m in (
        solicit(), solicit(DHCP6OptRapidCommit(), DHCP6OptIA_TA(iaid=1), DHCP6OptIA_PD(iaid=2)),
        dhcp6.DHCP6_Request() / CLIENT / OURS / DHCP6OptIA_NA(iaid=7, ianaopts=[DHCP6OptIAAddress(addr=GUEST6)]),
        dhcp6.DHCP6_Renew() / CLIENT / OURS / DHCP6OptIA_NA(iaid=7, ianaopts=[DHCP6OptIAAddress(addr="fd00::1")]),
        dhcp6.DHCP6_Confirm() / CLIENT / DHCP6OptIA_NA(iaid=7, ianaopts=[DHCP6OptIAAddress(addr=GUEST6)]),
        dhcp6.DHCP6_InfoRequest() / CLIENT, dhcp6.DHCP6_Release() / CLIENT / OURS)]
    verdicts: dict[DropReason | None, int] = {}
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(len(data))] = rng.choice((0, 1, 2, 3, 5, 0xFF, rng.randrange(256)))
        if rng.random() < 0.3:
            del data[rng.randrange(len(data) + 1):]
        if rng.random() < 0.2:
            data += rng.randbytes(rng.randrange(1, 40))
        result = exchange(endpoint, raw_udp6_frame(bytes(data)))
        if isinstance(result, list):
            assert len(result) == 1
            if verdicts.get(None, 0) < 400:  # scapy is slow: decode the first few hundred in full
                message, _opts = decode(result[0])
                assert message.msgtype in (2, 7)
            assert result[0][62] in (2, 7) and result[0][63:66] == data[1:4], "type and transaction id"
            verdicts[None] = verdicts.get(None, 0) + 1
        else:
            assert result in (DropReason.DHCPV6_MALFORMED, DropReason.DHCPV6_IGNORED)
            verdicts[result] = verdicts.get(result, 0) + 1
    assert all(verdicts.get(key, 0) > 100 for key in (None, DropReason.DHCPV6_MALFORMED, DropReason.DHCPV6_IGNORED)), \
        verdicts


def test_client_fqdn() -> None:
    """--fqdn: Client FQDN (39) in the replies that carry configuration, the name in wire format; flags 0,
    or O when the client set S (we never update its AAAA record), as passt."""
    from scapy.layers.dhcp6 import DHCP6OptClientFQDN

    endpoint = make_endpoint(fqdn="vm1.example.org")
    _message, opts = reply_to(endpoint, solicit())
    fqdn = only(opts, DHCP6OptClientFQDN)
    assert (fqdn.flags, fqdn.fqdn) == (0, b"vm1.example.org.")
    _message, opts = reply_to(endpoint, solicit(DHCP6OptClientFQDN(flags=1, fqdn="guest.example.")))
    assert only(opts, DHCP6OptClientFQDN).flags == 2
    _message, opts = reply_to(make_endpoint(), solicit())
    assert not of(opts, DHCP6OptClientFQDN)
    # A client's Client FQDN option without its flags byte is malformed: dropped, not read past its end.
    empty = bytes(solicit()) + b"\x00\x27\x00\x00"
    assert exchange(endpoint, raw_udp6_frame(empty)) == DropReason.DHCPV6_MALFORMED
