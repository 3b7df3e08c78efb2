"""NDP responder: NS -> NA proxy, DAD, RS -> RA, M/O flags, rate limit, periodic RAs, validation, fuzz.

Frames are built with the independent helpers of ipv6kit.py (and ndpkit.py) and
every reply is decoded by the reference decoder there (lengths, ICMPv6 checksum
word by word) plus the NDP option decoder below, so a bug shared by the
builders and the parsers under test cannot hide itself; the RA tests at the
end decode with scapy as well.
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet6 import (ICMPv6ND_RA, ICMPv6NDOptDNSSL, ICMPv6NDOptMTU,  # noqa: E402
                                ICMPv6NDOptPrefixInfo, ICMPv6NDOptRDNSS, ICMPv6NDOptSrcLLAddr, IPv6)
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Packet  # noqa: E402

from shardswitch.net import eth, icmpv6, ipv6, ndp  # noqa: E402
from shardswitch.net.drop import DropReason, PacketError  # noqa: E402
from shardswitch.net.ndp import NdpResponder  # noqa: E402
from shardswitch.net.params import GuestParams, ParamsError, resolve  # noqa: E402
from tests.net.ipv6kit import (ALL_NODES, GUEST_LL, OUR_LL, Icmpv6Frame, decode_icmpv6_frame,  # noqa: E402
                               icmpv6_frame, ip6)
from tests.net.ndpkit import GUEST_SLLA, ns_frame, rs_frame  # noqa: E402
from tests.net.net_testlib import GUEST_MAC, OUR_MAC, decode_dns_names  # noqa: E402

GUEST6 = ip6("2001:db8::15")
DNS6 = [ip6("2001:db8::53"), ip6("fe80::53")]
SEARCH = ["example.com", "lab.example.org"]
SOLICITED_GUEST = ip6("ff02::1:ff00:15")


def responder(*, ra: bool = True, dhcpv6: bool = True, rand: Callable[[], float] = random.random,
              **changes: object) -> NdpResponder:
    """A responder for a guest with IPv6 addressing, DNS and search domains (or ``changes``)."""
    fields: dict[str, object] = {
        "address": "10.0.2.15", "prefix_len": 24, "gateway": "10.0.2.2",
        "address6": "2001:db8::15", "dns6": ["2001:db8::53", "fe80::53"], "search": SEARCH}
    fields.update(changes)
    return NdpResponder(resolve(GuestParams(**fields)), ra, dhcpv6, rand)  # type: ignore[arg-type]


def run(resp: NdpResponder, frame: bytes, now: float = 0.0) -> list[bytes] | DropReason:
    """Dispatch one guest frame as the endpoint will: replies, or the drop reason."""
    out: list[bytes] = []
    view = memoryview(frame)
    try:
        _dst, src, ethertype = eth.parse_header(view)
        assert ethertype == eth.EtherType.IPV6
        packet = ipv6.parse(view[eth.ETH_HLEN:])
        if packet.next_header != ipv6.NextHeader.ICMPV6:
            raise PacketError(DropReason.IP_PROTO_UNHANDLED)
        resp.handle(src, packet, now, out)
    except PacketError as exc:
        assert out == [], "handlers append only once they cannot fail"
        return exc.reason
    return out


def one_reply(resp: NdpResponder, frame: bytes) -> Icmpv6Frame:
    """The single reply to ``frame``, decoded and checked."""
    result = run(resp, frame)
    assert isinstance(result, list) and len(result) == 1, result
    return decode_icmpv6_frame(result[0])


def options_of(area: bytes) -> list[tuple[int, bytes]]:
    """Reference NDP option decoder: (type, data after the 2-byte header)."""
    found = []
    while area:
        kind, units = area[0], area[1]
        assert units and units * 8 <= len(area), "option length"
        found.append((kind, area[2:units * 8]))
        area = area[units * 8:]
    return found


@dataclass
class Advertisement:
    """A decoded Neighbor Advertisement."""

    router: bool
    solicited: bool
    override: bool
    target: bytes
    options: list[tuple[int, bytes]]


def decode_na(reply: Icmpv6Frame) -> Advertisement:
    """Decode an NA reply, checking type, code and hop limit."""
    assert (reply.type, reply.code, reply.hop_limit) == (136, 0, 255)
    flags = reply.body[0]
    assert flags & 0x1F == 0 and reply.body[1:4] == bytes(3)
    return Advertisement(bool(flags & 0x80), bool(flags & 0x40), bool(flags & 0x20),
                         reply.body[4:20], options_of(reply.body[20:]))


@dataclass
class RouterAdvertisement:
    """A decoded Router Advertisement."""

    cur_hop_limit: int
    flags: int
    lifetime: int
    reachable: int
    retrans: int
    options: list[tuple[int, bytes]]

    def option(self, kind: int) -> bytes | None:
        """The only option of type ``kind``, or None."""
        values = [data for code, data in self.options if code == kind]
        assert len(values) <= 1
        return values[0] if values else None


def decode_ra(reply: Icmpv6Frame) -> RouterAdvertisement:
    """Decode an RA reply, checking type, code, hop limit and link-local source."""
    assert (reply.type, reply.code, reply.hop_limit) == (134, 0, 255)
    assert reply.src[:2] == b"\xfe\x80", "RAs come from a link-local address"
    assert len(reply.body) + 4 <= 1280 - 40
    hop, flags, lifetime, reachable, retrans = struct.unpack_from("!BBHII", reply.body)
    return RouterAdvertisement(hop, flags, lifetime, reachable, retrans,
                               options_of(reply.body[12:]))


# --- Neighbor Solicitation -> Advertisement ---------------------------------------------------

@pytest.mark.parametrize("target", [
    OUR_LL,                        # the default router
    ip6("2001:db8::1"),            # on-link global address
    ip6("2001:4860:4860::8888"),   # anything else
    ip6("fe80::1234"),             # another link-local address
])
def test_ns_answered_with_our_mac(target: bytes) -> None:
    """Any target but the guest's: NA from our link-local, R/S/O, our MAC as TLLA."""
    reply = one_reply(responder(), ns_frame(target))
    assert (reply.eth_dst, reply.eth_src) == (GUEST_MAC, OUR_MAC)
    assert (reply.src, reply.dst) == (OUR_LL, GUEST_LL)
    na = decode_na(reply)
    assert (na.router, na.solicited, na.override, na.target) == (True, True, True, target)
    assert na.options == [(2, OUR_MAC)]


def test_ns_unicast_probe_and_without_slla() -> None:
    """A unicast NUD probe (no SLLA option) from the guest's global address is answered."""
    reply = one_reply(responder(), ns_frame(OUR_LL, src=GUEST6, dst=OUR_LL, options=b""))
    assert reply.dst == GUEST6 and decode_na(reply).target == OUR_LL


@pytest.mark.parametrize("target, src", [
    (GUEST6, GUEST_LL),      # the configured address
    (GUEST_LL, GUEST_LL),    # the guest asking for its own source
    (ip6("2001:db8::aa"), ip6("2001:db8::aa")),  # a SLAAC address the guest made up
])
def test_ns_for_guest_own_address_is_silent(target: bytes, src: bytes) -> None:
    """Solicitations for the guest's own addresses are consumed without an answer."""
    assert run(responder(), ns_frame(target, src=src)) == []


@pytest.mark.parametrize("target", [GUEST6, OUR_LL, ip6("2001:db8::aa")])
def test_dad_probe_is_silent(target: bytes) -> None:
    """DAD probes (source ::) never get an answer, as in passt: the guest's DAD succeeds."""
    assert run(responder(), ns_frame(target, src=bytes(16), options=b"")) == []


@pytest.mark.parametrize("frame", [
    ns_frame(GUEST6, src=bytes(16)),                              # DAD with an SLLA option
    ns_frame(GUEST6, src=bytes(16), dst=ALL_NODES, options=b""),  # DAD not to solicited-node
    ns_frame(OUR_LL, hop_limit=64),                               # forwarded: hop limit < 255
    icmpv6_frame(GUEST_LL, OUR_LL, 135, 1, bytes(20)),            # code 1
    icmpv6_frame(GUEST_LL, OUR_LL, 135, 0, bytes(19)),            # target truncated
    ns_frame(ip6("ff02::1")),                                     # multicast target
    ns_frame(OUR_LL, options=b"\x01\x00" + bytes(6)),             # zero-length option
    ns_frame(OUR_LL, options=b"\x01\x02" + bytes(6)),             # option past the end
    ns_frame(OUR_LL, options=GUEST_SLLA + b"\x01"),               # option header truncated
    ns_frame(OUR_LL, options=(b"\x0e\x01" + bytes(6)) * 250),     # over MAX_NDP_LEN
])
def test_ns_malformed(frame: bytes) -> None:
    """RFC 4861 7.1.1 violations are NDP_MALFORMED."""
    assert run(responder(), frame) is DropReason.NDP_MALFORMED


def test_oversized_message_bound() -> None:
    """Messages over MAX_NDP_LEN are refused before their options are walked."""
    many = b"\x0e\x01" + bytes(6)
    fits = ndp.MAX_NDP_LEN - 24
    assert isinstance(run(responder(), ns_frame(OUR_LL, options=many * (fits // 8))), list)
    assert run(responder(), ns_frame(OUR_LL, options=many * (fits // 8 + 1))) is (
        DropReason.NDP_MALFORMED)


def test_ns_bad_checksum_and_truncation() -> None:
    """Checksum and length errors are reported by the ICMPv6 layer."""
    assert run(responder(), ns_frame(OUR_LL, good_checksum=False)) is (
        DropReason.ICMPV6_BAD_CHECKSUM)
    assert run(responder(), icmpv6_frame(GUEST_LL, OUR_LL, 135, 0, b"")) is (
        DropReason.ICMPV6_MALFORMED)


def test_link_local_without_global_ipv6() -> None:
    """No address6: our link-local still resolves; the RA makes us no default router."""
    resp = responder(address6="", dns6=[], search=[])
    na = decode_na(one_reply(resp, ns_frame(OUR_LL)))
    assert na.target == OUR_LL and na.options == [(2, OUR_MAC)]
    ra = decode_ra(one_reply(resp, rs_frame()))
    assert ra.lifetime == 0
    assert [kind for kind, _data in ra.options] == [1, 5]


# --- Router Solicitation -> Advertisement -------------------------------------------------------

def test_rs_full_advertisement() -> None:
    """RA to the soliciting address: M and O (DHCPv6), SLLA, MTU, /64 prefix (L, A), RDNSS and DNSSL."""
    reply = one_reply(responder(), rs_frame())
    assert (reply.eth_dst, reply.eth_src, reply.src, reply.dst) == (GUEST_MAC, OUR_MAC, OUR_LL,
                                                                    GUEST_LL)
    ra = decode_ra(reply)
    assert (ra.cur_hop_limit, ra.flags, ra.lifetime, ra.reachable, ra.retrans) == (
        64, 0xC0, 65535, 0, 0)
    assert ra.option(1) == OUR_MAC
    assert ra.option(5) == struct.pack("!HI", 0, 65520)
    prefix = ra.option(3)
    assert prefix is not None
    assert struct.unpack("!BBIII16s", prefix) == (64, 0xC0, 0xFFFFFFFF, 0xFFFFFFFF, 0,
                                                  ip6("2001:db8::"))
    rdnss = ra.option(25)
    assert rdnss is not None
    assert rdnss == struct.pack("!HI", 0, 0xFFFFFFFF) + b"".join(DNS6)
    dnssl = ra.option(31)
    assert dnssl is not None and dnssl[:6] == struct.pack("!HI", 0, 0xFFFFFFFF)
    names = dnssl[6:]
    assert decode_dns_names(names.rstrip(b"\0") + b"\0") == SEARCH
    assert b"\xc0" not in names, "no compression in DNSSL"


def test_rs_without_prefix_dns_or_search() -> None:
    """With IPv6 addressing but no DNS: prefix and MTU only."""
    ra = decode_ra(one_reply(responder(dns6=[], search=[]), rs_frame()))
    assert [kind for kind, _data in ra.options] == [1, 5, 3]
    assert ra.lifetime == 65535


def test_rs_dnssl_without_rdnss_and_rdnss_without_dnssl() -> None:
    """RDNSS and DNSSL are independent of each other."""
    only_search = decode_ra(one_reply(responder(dns6=[]), rs_frame()))
    assert only_search.option(25) is None and only_search.option(31) is not None
    only_dns = decode_ra(one_reply(responder(search=[]), rs_frame()))
    assert only_dns.option(25) is not None and only_dns.option(31) is None


def test_rs_from_unspecified_goes_to_all_nodes() -> None:
    """An RS from :: (no SLLA allowed) is answered to ff02::1 at 33:33:00:00:00:01."""
    reply = one_reply(responder(), rs_frame(src=bytes(16), options=b""))
    assert reply.dst == ALL_NODES and reply.eth_dst == bytes.fromhex("333300000001")
    assert decode_ra(reply).lifetime == 65535
    assert run(responder(), rs_frame(src=bytes(16))) is DropReason.NDP_MALFORMED


def test_ra_source_follows_link_local_gateway() -> None:
    """gateway6 link-local: NAs and RAs come from it; a global gateway6 does not change that."""
    via_gw = responder(gateway6="fe80::1")
    assert via_gw.router_address == ip6("fe80::1")
    assert one_reply(via_gw, rs_frame()).src == ip6("fe80::1")
    assert one_reply(via_gw, ns_frame(ip6("fe80::1"))).src == ip6("fe80::1")
    assert responder(gateway6="2001:db8::1").router_address == OUR_LL


def test_small_mtu_has_no_mtu_option() -> None:
    """An IPv4-only guest with an MTU under 1280 gets no MTU option."""
    ra = decode_ra(one_reply(responder(address6="", mtu=1000, dns6=[], search=[]), rs_frame()))
    assert ra.option(5) is None


def test_ra_size_limits() -> None:
    """Too many DNS servers refuse to start; search domains that do not fit are dropped."""
    fits = (ndp.MAX_RA_LEN - 16 - 8 - 8 - 32 - 8) // 16
    assert decode_ra(one_reply(responder(dns6=[f"2001:db8::{i:x}" for i in range(1, fits + 1)]),
                               rs_frame())).option(25) is not None
    for count in (fits + 1, 200):
        with pytest.raises(ParamsError):
            responder(dns6=[f"2001:db8::{i:x}" for i in range(1, count + 1)])
    many = [f"{'x' * 60}.example{i}.com" for i in range(30)]
    resp = responder(search=many)
    assert resp.search_dropped and resp.search_dropped == tuple(many[-len(resp.search_dropped):])
    ra = decode_ra(one_reply(resp, rs_frame()))
    dnssl = ra.option(31)
    assert dnssl is not None
    kept = decode_dns_names(dnssl[6:].rstrip(b"\0") + b"\0")
    assert kept == many[:len(many) - len(resp.search_dropped)]


def test_rs_malformed() -> None:
    """RS validation: hop limit, code, options."""
    for frame in (rs_frame(hop_limit=1),
                  icmpv6_frame(GUEST_LL, ip6("ff02::2"), 133, 3, bytes(4)),
                  rs_frame(options=b"\x01\x00" + bytes(6))):
        assert run(responder(), frame) is DropReason.NDP_MALFORMED


def test_unsolicited_ra_and_schedule() -> None:
    """The periodic RA goes to all-nodes; delays follow RFC 4861 bounds."""
    resp = responder()
    reply = decode_icmpv6_frame(resp.unsolicited_ra())
    assert reply.dst == ALL_NODES and reply.eth_dst == bytes.fromhex("333300000001")
    assert decode_ra(reply).option(3) is not None
    assert ndp.next_ra_delay(0.0, 0) == ndp.next_ra_delay(0.999, 2) == 16.0
    assert ndp.next_ra_delay(0.0, 3) == pytest.approx(200.0)
    assert ndp.next_ra_delay(0.9999999, 10) == pytest.approx(600.0)


# --- Other ICMPv6 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, reason", [
    (134, DropReason.NDP_IGNORED),     # RA from the guest
    (136, DropReason.NDP_IGNORED),     # unsolicited NA (Linux sends these after DAD)
    (137, DropReason.NDP_IGNORED),     # redirect
    (128, DropReason.ICMPV6_IGNORED),  # echo request: not NDP's business
    (143, DropReason.ICMPV6_IGNORED),  # MLDv2 report
])
def test_other_messages(kind: int, reason: DropReason) -> None:
    """Non-solicitations are counted, not answered."""
    assert run(responder(), icmpv6_frame(GUEST_LL, ALL_NODES, kind, 0, bytes(28))) is reason


def test_mld_report_behind_hop_by_hop_header() -> None:
    """An MLDv2 report (router alert in hop-by-hop options) reaches ICMPv6 and is ignored."""
    router_alert = bytes((58, 0, 5, 2, 0, 0, 1, 0))
    frame = icmpv6_frame(GUEST_LL, ip6("ff02::16"), 143, 0, bytes(24), hop_limit=1,
                         extensions=router_alert, first_header=0)
    assert run(responder(), frame) is DropReason.ICMPV6_IGNORED


def test_handle_icmpv6_entry_point() -> None:
    """The dispatcher-facing entry point takes an already parsed message."""
    resp = responder()
    frame = ns_frame(OUR_LL)
    packet = ipv6.parse(memoryview(frame)[14:])
    out: list[bytes] = []
    resp.handle_icmpv6(GUEST_MAC, packet, icmpv6.parse(packet), 1.0, out)
    assert decode_na(decode_icmpv6_frame(out[0])).target == OUR_LL


# --- Fuzz -----------------------------------------------------------------------------------------

def rewrap(rng: random.Random, frame: bytes) -> bytes:
    """Mutate the ICMPv6 message of a seed frame and re-checksum it, to reach NDP validation."""
    src, dst = frame[22:38], frame[38:54]
    hop_limit = frame[21] if rng.random() < 0.8 else rng.randrange(256)
    message = bytearray(frame[54:])
    for _ in range(rng.randrange(1, 5)):
        message[rng.randrange(len(message))] = rng.choice((0, 1, 2, 3, 0xFF, rng.randrange(256)))
    if rng.random() < 0.3:
        message = message[:rng.randrange(len(message) + 1)]
    if rng.random() < 0.3:
        message += rng.randbytes(rng.randrange(1, 24))
    return icmpv6_frame(src, dst, message[0] if message else 135, message[1] if len(message) > 1
                        else 0, bytes(message[4:]), hop_limit=hop_limit, eth_dst=frame[:6])


def test_fuzz_never_raises() -> None:
    """Thousands of mutated NS/RS frames: a verdict every time, only valid replies."""
    rng = random.Random(0xD15C0)
    resp = responder()
    seeds = [ns_frame(OUR_LL), ns_frame(GUEST6, src=bytes(16), options=b""), rs_frame(),
             rs_frame(src=bytes(16), options=b""), ns_frame(ip6("2001:db8::9"), src=GUEST6)]
    verdicts: dict[object, int] = {}
    for i in range(3000):
        seed = rng.choice(seeds)
        if i % 2:
            frame = rewrap(rng, seed)
        else:
            data = bytearray(seed)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(14, len(data))] ^= 1 << rng.randrange(8)
            if rng.random() < 0.3:
                del data[rng.randrange(14, len(data) + 1):]
            frame = bytes(data)
        result = run(resp, frame)
        if isinstance(result, list):
            for reply in result:
                decoded = decode_icmpv6_frame(reply)
                assert decoded.type in (134, 136) and decoded.hop_limit == 255
                assert decoded.eth_src == OUR_MAC and decoded.src == OUR_LL
                if decoded.type == 136:
                    decode_na(decoded)
                else:
                    decode_ra(decoded)
            key: object = "reply" if result else "silent"
        else:
            key = result
        verdicts[key] = verdicts.get(key, 0) + 1
    for key in ("reply", "silent", DropReason.NDP_MALFORMED, DropReason.ICMPV6_BAD_CHECKSUM,
                DropReason.IPV6_MALFORMED, DropReason.ICMPV6_IGNORED):
        assert verdicts.get(key, 0) > 0, (key, verdicts)


# --- DHCPv6 flags, rate limit and periodic RAs (decoded by scapy) ---------------------------------

def scapy_ra(frame: bytes) -> Packet:
    """Decode an RA frame with scapy, checking the re-encoding and the ICMPv6 checksum it computes."""
    packet = Ether(frame)
    assert bytes(packet) == frame
    recomputed = packet.copy()
    recomputed[ICMPv6ND_RA].cksum = None
    assert Ether(bytes(recomputed))[ICMPv6ND_RA].cksum == packet[ICMPv6ND_RA].cksum
    assert packet[IPv6].hlim == 255 and packet[IPv6].src == "fe80::9855:9aff:fe55:9a55"
    return packet


def test_ra_managed_and_other_flags_with_dhcpv6() -> None:
    """DHCPv6 on and an address to give: M and O set; the prefix keeps L and A (SLAAC still works)."""
    resp = responder()
    assert resp.ra_flags == ndp.RaFlags.MANAGED | ndp.RaFlags.OTHER == 0xC0
    result = run(resp, rs_frame())
    assert isinstance(result, list)
    packet = scapy_ra(result[0])
    ra = packet[ICMPv6ND_RA]
    assert (ra.M, ra.O, ra.H, ra.prf, ra.P) == (1, 1, 0, 0, 0)
    assert (ra.chlim, ra.routerlifetime, ra.reachabletime, ra.retranstimer) == (64, 65535, 0, 0)
    prefix = packet[ICMPv6NDOptPrefixInfo]
    assert (prefix.L, prefix.A, prefix.prefixlen, prefix.prefix) == (1, 1, 64, "2001:db8::")
    assert (prefix.validlifetime, prefix.preferredlifetime) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert packet[ICMPv6NDOptSrcLLAddr].lladdr == "9a:55:9a:55:9a:55"
    assert packet[ICMPv6NDOptMTU].mtu == 65520
    assert packet[ICMPv6NDOptRDNSS].dns == ["2001:db8::53", "fe80::53"]
    assert packet[ICMPv6NDOptDNSSL].searchlist == [name + "." for name in SEARCH]


@pytest.mark.parametrize("changes", [{"dhcpv6": False}, {"address6": "", "dns6": [], "search": []}])
def test_ra_without_dhcpv6_flags(changes: dict[str, object]) -> None:
    """No DHCPv6 server, or no address to give: neither M nor O."""
    resp = responder(**changes)
    assert resp.ra_flags == ndp.RaFlags.NONE
    result = run(resp, rs_frame())
    assert isinstance(result, list)
    ra = scapy_ra(result[0])[ICMPv6ND_RA]
    assert (ra.M, ra.O) == (0, 0)


def test_multicast_ra_rate_limit() -> None:
    """RAs to all-nodes at most one per MIN_DELAY_BETWEEN_RAS; a limited RS brings the next one forward."""
    resp = responder(rand=lambda: 0.5)
    from_any = rs_frame(src=bytes(16), options=b"")
    first = run(resp, from_any, 100.0)
    assert isinstance(first, list) and len(first) == 1
    assert scapy_ra(first[0])[IPv6].dst == "ff02::1"
    assert resp.last_multicast_ra == 100.0
    assert run(resp, from_any, 101.0) == []           # consumed, answered later
    assert resp.next_periodic_ra == 100.0 + ndp.MIN_DELAY_BETWEEN_RAS
    unicast = run(resp, rs_frame(), 101.5)            # unicast answers are not limited
    assert isinstance(unicast, list) and scapy_ra(unicast[0])[IPv6].dst == "fe80::5054:ff:fe12:3456"
    assert resp.periodic_ra(102.9) is None
    periodic = resp.periodic_ra(103.0)
    assert periodic is not None and scapy_ra(periodic)[IPv6].dst == "ff02::1"
    assert resp.next_periodic_ra == 103.0 + ndp.next_ra_delay(0.5, 1) == 119.0
    assert run(resp, from_any, 104.0) == []
    assert resp.next_periodic_ra == 106.0
    assert resp.periodic_ra(105.0) is None and resp.periodic_ra(106.0) is not None
    later = run(resp, from_any, 109.5)
    assert isinstance(later, list) and len(later) == 1


def test_periodic_ra_schedule() -> None:
    """The first call schedules; then 3 RAs at most 16 s apart, then 200..600 s apart."""
    draws = iter([0.0, 0.0, 0.0, 0.5, 1.0])
    resp = responder(rand=lambda: next(draws))
    sent_at = []
    for second in range(0, 700):
        frame = resp.periodic_ra(float(second))
        if frame is not None:
            packet = scapy_ra(frame)
            assert packet.dst == "33:33:00:00:00:01" and packet[IPv6].dst == "ff02::1"
            assert (packet[ICMPv6ND_RA].M, packet[ICMPv6ND_RA].O) == (1, 1)
            sent_at.append(second)
    assert sent_at == [16, 32, 48, 448]
    assert resp.periodic_sent == 4


def test_no_ra_means_no_periodic_ra() -> None:
    """--no-ra: no periodic RA, solicitations ignored."""
    resp = responder(ra=False)
    assert resp.periodic_ra(0.0) is None and resp.periodic_ra(1000.0) is None
    assert run(resp, rs_frame()) is DropReason.NDP_IGNORED


def test_mtu_not_offered() -> None:
    """-m 0 (offer_mtu off): the RA carries no MTU option, the rest is unchanged."""
    ra = decode_ra(one_reply(responder(offer_mtu=False, dns6=[], search=[]), rs_frame()))
    assert [kind for kind, _data in ra.options] == [1, 3]
