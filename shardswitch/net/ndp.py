"""IPv6 Neighbor Discovery for the guest: NS -> NA proxy and RS -> RA (RFC 4861).

Theory of operation (as passt's ndp.c): the guest sees a point-to-point link
where every IPv6 address but its own lives behind our MAC, and we are its
router.  :class:`NdpResponder` therefore

* answers every Neighbor Solicitation with a Neighbor Advertisement naming
  our MAC as the target link-layer address, flags Router, Solicited and
  Override set, whatever the target (our link-local address, the gateway,
  any other on-link or off-link address), except:

  - Duplicate Address Detection probes (source ::) are consumed without an
    answer, so the guest's DAD always succeeds (passt does the same);
  - solicitations for the guest's own addresses (the configured
    ``address6``, or the source of the solicitation itself) are consumed
    without an answer, as ARP does for the guest's IPv4 address;

* answers every Router Solicitation with a Router Advertisement, unicast to
  the soliciting address, or to all-nodes (ff02::1) when that is ::.  The RA
  is built once at start-up: current hop limit 64; the Managed and Other
  flags (:class:`RaFlags`) when the DHCPv6 server runs (``dhcpv6=True``)
  and the guest has IPv6 addressing, as passt does, so that a DHCPv6
  client asks :mod:`shardswitch.net.dhcpv6` for the address and the DNS
  options (no flags otherwise); router lifetime 65535 s (RFC 8319) when
  the guest has IPv6 addressing, else 0 (we are then no default router but
  still tell the MTU); and the options source link-layer address, MTU
  (when the MTU is at least 1280), prefix information for the /64 holding
  ``address6`` with the On-link and Autonomous flags and infinite lifetimes
  (SLAAC needs a 64-bit prefix, whatever ``prefix6_len`` the host uses;
  passt does the same; the Autonomous flag stays with DHCPv6 on, so a guest
  without a DHCPv6 client still gets the same address by SLAAC), RDNSS
  (RFC 8106) when there are IPv6 DNS servers and DNSSL when there are
  search domains.  Search domains that do not fit a 1280-byte packet are
  left out (:attr:`NdpResponder.search_dropped`).

Multicast RAs are rate limited as RFC 4861 section 6.2.6 requires: at most
one per :data:`MIN_DELAY_BETWEEN_RAS` seconds (``now`` is passed in, never
read).  A solicitation from :: arriving sooner gets no immediate answer:
it brings the next periodic RA forward to the end of that interval instead.
Unicast answers are not limited (the guest is the only soliciting node).
Periodic RAs: :meth:`NdpResponder.periodic_ra`, called from the worker's
once-a-second tick, returns the all-nodes RA when one is due: the first
call schedules the first one, and each is followed by the next after
:func:`next_ra_delay` seconds (the first
:data:`MAX_INITIAL_RTR_ADVERTISEMENTS` at most
:data:`MAX_INITIAL_RTR_ADVERT_INTERVAL` apart), drawn from the injectable
random source so that tests are deterministic.  The solicited-RA random
delay of up to MAX_RA_DELAY_TIME is not applied (one guest, no collisions
to avoid).  :meth:`NdpResponder.unsolicited_ra` builds that frame
without any scheduling.

NAs, RAs (and DHCPv6 replies) come from :attr:`NdpResponder.router_address`
(:attr:`~shardswitch.net.params.ResolvedParams.router_ll6`): ``gateway6``
when it is link-local, else our own link-local address (RAs must come from
a link-local address, and the guest's default route points at it).  They
carry hop limit 255 and go to the guest's MAC, or to the IPv6 multicast MAC
for a multicast destination.

Incoming NDP messages are validated as RFC 4861 sections 6.1.1 and 7.1.1
require: hop limit 255, code 0, minimum length, options of non-zero length
within the message, a non-multicast target, and for an unspecified source no
source link-layer address option (and, for NS, a solicited-node
destination).  Failures are ``NDP_MALFORMED``; advertisements and redirects
from the guest are ``NDP_IGNORED``; non-NDP ICMPv6 is ``ICMPV6_IGNORED``.
Messages are accepted up to :data:`MAX_NDP_LEN` bytes, which bounds the
per-option loop.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence
from enum import IntEnum, IntFlag

from . import icmpv6, ipv6
from .drop import DropReason, PacketError
from .icmpv6 import Icmpv6Message, Icmpv6Type
from .ipv6 import Ipv6Packet
from .params import MIN_MTU6, ParamsError, ResolvedParams

#: Hop limit of every NDP message, sent and accepted (RFC 4861).
NDP_HOP_LIMIT = 255
#: Type, code, checksum, reserved (RS): the shortest NDP message.
RS_LEN = 8
#: Type, code, checksum, flags/reserved, target address (NS and NA).
TARGET_MESSAGE = struct.Struct("!BBHI16s")
NS_LEN = TARGET_MESSAGE.size
assert NS_LEN == 24
#: Type, code, checksum, current hop limit, flags, router lifetime,
#: reachable time, retransmission timer.
RA_HEADER = struct.Struct("!BBHBBHII")
assert RA_HEADER.size == 16
#: Option type, length in 8-byte units, MAC (source/target link-layer address).
LL_ADDR_OPTION = struct.Struct("!BB6s")
#: Option type, length, reserved, MTU.
MTU_OPTION = struct.Struct("!BBHI")
#: Option type, length, prefix length, flags, valid lifetime, preferred
#: lifetime, reserved, prefix.
PREFIX_OPTION = struct.Struct("!BBBBIII16s")
assert PREFIX_OPTION.size == 32
#: Option type, length, reserved, lifetime (RDNSS and DNSSL, RFC 8106).
DNS_OPTION_HEADER = struct.Struct("!BBHI")
#: Options are multiples of this many bytes.
OPTION_UNIT = 8
#: Longest NDP message accepted (what fits a 1500-byte MTU).
MAX_NDP_LEN = 1500 - ipv6.IPV6_HLEN
#: Longest RA we build: it must fit the IPv6 minimum MTU.
MAX_RA_LEN = MIN_MTU6 - ipv6.IPV6_HLEN
#: Current hop limit advertised to the guest.
CUR_HOP_LIMIT = 64
#: Router lifetime in seconds (the RFC 8319 maximum).
ROUTER_LIFETIME = 65535
#: Length of the advertised prefix (SLAAC needs 64).
SLAAC_PREFIX_LEN = 64
#: "Infinity" for prefix and DNS lifetimes.
INFINITE_LIFETIME = 0xFFFFFFFF
#: Unsolicited RA intervals in seconds (RFC 4861 sections 6.2.1 and 10).
MAX_RTR_ADV_INTERVAL = 600.0
MIN_RTR_ADV_INTERVAL = MAX_RTR_ADV_INTERVAL / 3
MAX_INITIAL_RTR_ADVERT_INTERVAL = 16.0
MAX_INITIAL_RTR_ADVERTISEMENTS = 3
#: Shortest interval between two multicast RAs in seconds (RFC 4861 section 10).
MIN_DELAY_BETWEEN_RAS = 3.0


class NdpOption(IntEnum):
    """NDP option types."""

    SOURCE_LL_ADDR = 1
    TARGET_LL_ADDR = 2
    PREFIX_INFO = 3
    REDIRECTED_HEADER = 4
    MTU = 5
    RDNSS = 25
    DNSSL = 31


class NaFlags(IntFlag):
    """Flags of a Neighbor Advertisement (top bits of its 32-bit flags word)."""

    ROUTER = 0x80000000
    SOLICITED = 0x40000000
    OVERRIDE = 0x20000000


class RaFlags(IntFlag):
    """Flags of a Router Advertisement."""

    NONE = 0
    #: Managed address configuration: addresses are available over DHCPv6.
    MANAGED = 0x80
    #: Other configuration: other configuration (DNS) is available over DHCPv6.
    OTHER = 0x40


class PrefixFlags(IntFlag):
    """Flags of the prefix information option."""

    ON_LINK = 0x80
    AUTONOMOUS = 0x40


def parse_options(area: memoryview) -> list[tuple[int, memoryview]]:
    """Split an NDP option area into ``(type, option bytes including its header)``.

    Raises :class:`PacketError` (``NDP_MALFORMED``) for an option of length
    0 or one running past the area.
    """
    options = []
    offset, size = 0, len(area)
    while offset < size:
        if offset + 2 > size:
            raise PacketError(DropReason.NDP_MALFORMED, f"option header truncated at {offset}")
        length = area[offset + 1] * OPTION_UNIT
        if not length:
            raise PacketError(DropReason.NDP_MALFORMED, f"zero-length option at {offset}")
        if offset + length > size:
            raise PacketError(DropReason.NDP_MALFORMED, f"option at {offset} runs past the message")
        options.append((area[offset], area[offset:offset + length]))
        offset += length
    return options


def _has_option(options: list[tuple[int, memoryview]], kind: NdpOption) -> bool:
    """True when ``options`` include one of type ``kind``."""
    return any(code == kind for code, _value in options)


def encode_dns_names(names: Sequence[str]) -> bytes:
    """Encode names as RFC 1035 labels without compression (DNSSL, RFC 8106 section 5.2).

    Names must already be valid (see :func:`shardswitch.net.params.normalize_domain`).
    """
    out = bytearray()
    for name in names:
        for label in name.rstrip(".").split("."):
            out.append(len(label))
            out += label.encode("ascii")
        out.append(0)
    return bytes(out)


def _pad_to_unit(data: bytes) -> bytes:
    """``data`` followed by zeros up to a multiple of :data:`OPTION_UNIT` bytes."""
    return data + bytes(-len(data) % OPTION_UNIT)


def rdnss_option(servers: Sequence[bytes]) -> bytes:
    """The RDNSS option listing ``servers`` (16-byte addresses), infinite lifetime."""
    return b"".join((DNS_OPTION_HEADER.pack(NdpOption.RDNSS, 1 + 2 * len(servers), 0,
                                            INFINITE_LIFETIME), *servers))


def rdnss_option_len(count: int) -> int:
    """Length of an RDNSS option listing ``count`` servers."""
    return DNS_OPTION_HEADER.size + ipv6.IPV6_ALEN * count


def dnssl_option(names: Sequence[str]) -> bytes:
    """The DNSSL option listing search domains ``names``, infinite lifetime.

    Raises ValueError when the option would exceed 255 units of 8 bytes
    (the caller keeps it within :data:`MAX_RA_LEN` first).
    """
    body = _pad_to_unit(encode_dns_names(names))
    units = 1 + len(body) // OPTION_UNIT
    if units > 0xFF:
        raise ValueError(f"DNSSL option of {units * OPTION_UNIT} bytes")
    return DNS_OPTION_HEADER.pack(NdpOption.DNSSL, units, 0, INFINITE_LIFETIME) + body


def dnssl_option_len(names: Sequence[str]) -> int:
    """Length of the DNSSL option for ``names``."""
    return DNS_OPTION_HEADER.size + len(_pad_to_unit(encode_dns_names(names)))


def next_ra_delay(rand: float, sent: int) -> float:
    """Seconds until the next unsolicited RA (RFC 4861 sections 6.2.1 and 6.2.4).

    ``rand`` is uniform in [0, 1) (from the caller's random source, so this
    stays deterministic); ``sent`` is how many unsolicited RAs went out so
    far: the first :data:`MAX_INITIAL_RTR_ADVERTISEMENTS` come at most
    :data:`MAX_INITIAL_RTR_ADVERT_INTERVAL` seconds apart.
    """
    delay = MIN_RTR_ADV_INTERVAL + rand * (MAX_RTR_ADV_INTERVAL - MIN_RTR_ADV_INTERVAL)
    if sent < MAX_INITIAL_RTR_ADVERTISEMENTS:
        delay = min(delay, MAX_INITIAL_RTR_ADVERT_INTERVAL)
    return delay


class NdpResponder:
    """Neighbor Discovery for one guest: proxy NAs for everything but the guest, and RAs."""

    def __init__(self, params: ResolvedParams, ra: bool = True, dhcpv6: bool = True,
                 rand: Callable[[], float] = random.random) -> None:
        """Build the RA once; raises ParamsError when the IPv6 DNS servers cannot fit it.

        ``ra=False`` (``--no-ra``): router solicitations are not answered
        (NDP_IGNORED) and :meth:`periodic_ra` sends nothing.  ``dhcpv6``: a
        DHCPv6 server runs, the RA sets the Managed and Other flags when the
        guest has IPv6 addressing.  ``rand`` gives uniform numbers in [0, 1)
        for the periodic RA schedule.
        """
        self._ra = ra
        self._rand = rand
        self._our_mac = params.our_mac
        self._guest_address6 = params.address6
        #: Source address of our NAs and RAs (link-local).
        self.router_address = params.router_ll6
        #: Flags of our RAs.
        self.ra_flags = (RaFlags.MANAGED | RaFlags.OTHER if dhcpv6 and params.address6 is not None
                         else RaFlags.NONE)
        #: When the last multicast RA went out, or None before the first.
        self.last_multicast_ra: float | None = None
        #: When the next periodic RA is due (None: not scheduled yet; the first call of :meth:`periodic_ra` does).
        self.next_periodic_ra: float | None = None
        #: Periodic (unsolicited) RAs sent so far.
        self.periodic_sent = 0
        fixed = self._ra_fixed_part(params, self.ra_flags)
        size = len(fixed) + (rdnss_option_len(len(params.dns6)) if params.dns6 else 0)
        if size > MAX_RA_LEN:
            raise ParamsError(f"router advertisement of {size} bytes (too many IPv6 DNS "
                              f"servers?) exceeds {MAX_RA_LEN} bytes")
        if params.dns6:
            fixed += rdnss_option(params.dns6)
        kept = len(params.search)
        while kept and len(fixed) + dnssl_option_len(params.search[:kept]) > MAX_RA_LEN:
            kept -= 1
        #: The whole RA message, checksum 0 (it depends on the destination).
        self.router_advertisement = fixed + (dnssl_option(params.search[:kept]) if kept else b"")
        #: Search domains left out of the RA for lack of room (for the caller to log).
        self.search_dropped: tuple[str, ...] = params.search[kept:]

    @staticmethod
    def _ra_fixed_part(params: ResolvedParams, flags: RaFlags) -> bytes:
        """RA header (with ``flags``) and the options source link-layer address, MTU and prefix."""
        lifetime = ROUTER_LIFETIME if params.address6 is not None else 0
        parts = [RA_HEADER.pack(Icmpv6Type.ROUTER_ADVERTISEMENT, 0, 0, CUR_HOP_LIMIT, flags,
                                lifetime, 0, 0),
                 LL_ADDR_OPTION.pack(NdpOption.SOURCE_LL_ADDR, 1, params.our_mac)]
        if params.offer_mtu and params.mtu >= MIN_MTU6:
            parts.append(MTU_OPTION.pack(NdpOption.MTU, 1, 0, params.mtu))
        if params.address6 is not None:
            parts.append(PREFIX_OPTION.pack(
                NdpOption.PREFIX_INFO, PREFIX_OPTION.size // OPTION_UNIT, SLAAC_PREFIX_LEN,
                PrefixFlags.ON_LINK | PrefixFlags.AUTONOMOUS, INFINITE_LIFETIME, INFINITE_LIFETIME,
                0, ipv6.prefix_of(params.address6, SLAAC_PREFIX_LEN)))
        return b"".join(parts)

    def reply(self, eth_src: bytes, packet: Ipv6Packet, message: Icmpv6Message,
              now: float) -> bytes | None:
        """The reply frame for an NDP message from ``eth_src`` at time ``now``, or None to stay silent.

        ``message`` is ``packet``'s checksum-verified ICMPv6 message.  Raises
        :class:`PacketError` (``NDP_MALFORMED``, ``NDP_IGNORED``,
        ``ICMPV6_IGNORED`` for non-NDP types).
        """
        kind = message.type
        if kind not in icmpv6.NDP_TYPES:
            raise PacketError(DropReason.ICMPV6_IGNORED, f"type {kind}")
        data = message.message
        if packet.hop_limit != NDP_HOP_LIMIT or message.code or len(data) > MAX_NDP_LEN:
            raise PacketError(DropReason.NDP_MALFORMED,
                              f"hop limit {packet.hop_limit}, code {message.code}, "
                              f"{len(data)} bytes")
        if kind == Icmpv6Type.NEIGHBOR_SOLICITATION:
            return self._answer_solicitation(eth_src, packet, data)
        if kind == Icmpv6Type.ROUTER_SOLICITATION and self._ra:
            return self._answer_router_solicitation(eth_src, packet, data, now)
        raise PacketError(DropReason.NDP_IGNORED, f"type {kind}")

    def _answer_solicitation(self, eth_src: bytes, packet: Ipv6Packet,
                             data: memoryview) -> bytes | None:
        """NA for a Neighbor Solicitation, or None for DAD and the guest's own addresses."""
        if len(data) < NS_LEN:
            raise PacketError(DropReason.NDP_MALFORMED, f"{len(data)}-byte solicitation")
        target = bytes(data[8:NS_LEN])
        options = parse_options(data[NS_LEN:])
        if ipv6.is_multicast(target):
            raise PacketError(DropReason.NDP_MALFORMED, "multicast target")
        if ipv6.is_unspecified(packet.src):
            if not ipv6.is_solicited_node(packet.dst) or _has_option(options,
                                                                     NdpOption.SOURCE_LL_ADDR):
                raise PacketError(DropReason.NDP_MALFORMED, "bad duplicate address probe")
            return None  # DAD: let the guest's address be unique
        if target in (self._guest_address6, packet.src):
            return None  # the guest's own address
        head = b"".join((
            TARGET_MESSAGE.pack(Icmpv6Type.NEIGHBOR_ADVERTISEMENT, 0, 0,
                                NaFlags.ROUTER | NaFlags.SOLICITED | NaFlags.OVERRIDE, target),
            LL_ADDR_OPTION.pack(NdpOption.TARGET_LL_ADDR, 1, self._our_mac)))
        return icmpv6.build_frame(eth_src, self._our_mac, self.router_address, packet.src, head,
                                  hop_limit=NDP_HOP_LIMIT)

    def _answer_router_solicitation(self, eth_src: bytes, packet: Ipv6Packet,
                                    data: memoryview, now: float) -> bytes | None:
        """RA for a Router Solicitation: unicast to its source, or to all-nodes from :: (rate limited)."""
        options = parse_options(data[RS_LEN:])
        if not ipv6.is_unspecified(packet.src):
            return self._ra_frame(eth_src, packet.src)
        if _has_option(options, NdpOption.SOURCE_LL_ADDR):
            raise PacketError(DropReason.NDP_MALFORMED, "source link-layer address from ::")
        if self._multicast_limited(now):
            return None
        self.last_multicast_ra = now
        return self.unsolicited_ra()

    def _multicast_limited(self, now: float) -> bool:
        """True when a multicast RA now would come too soon after the last one.

        The next periodic RA is then brought forward to the first moment allowed.
        """
        last = self.last_multicast_ra
        if last is None or now - last >= MIN_DELAY_BETWEEN_RAS:
            return False
        allowed = last + MIN_DELAY_BETWEEN_RAS
        if self.next_periodic_ra is None or allowed < self.next_periodic_ra:
            self.next_periodic_ra = allowed
        return True

    def periodic_ra(self, now: float) -> bytes | None:
        """The all-nodes RA frame when a periodic one is due at ``now``, else None.

        For the worker's once-a-second tick.  The first call only schedules
        the first RA, :func:`next_ra_delay` later (as passt: a guest coming up
        solicits one, and is answered at once, so there is no burst when the
        link comes up); each one sent schedules the next.  None without RAs
        (``ra=False``).
        """
        if not self._ra:
            return None
        if self.next_periodic_ra is None:
            self.next_periodic_ra = now + next_ra_delay(self._rand(), self.periodic_sent)
            return None
        if now < self.next_periodic_ra:
            return None
        if self._multicast_limited(now):
            return None
        self.last_multicast_ra = now
        self.periodic_sent += 1
        self.next_periodic_ra = now + next_ra_delay(self._rand(), self.periodic_sent)
        return self.unsolicited_ra()

    def _ra_frame(self, eth_dst: bytes, dst: bytes) -> bytes:
        """The RA as a frame to ``dst`` at ``eth_dst``."""
        return icmpv6.build_frame(eth_dst, self._our_mac, self.router_address, dst,
                                  self.router_advertisement, hop_limit=NDP_HOP_LIMIT)

    def unsolicited_ra(self) -> bytes:
        """The RA frame to all-nodes (ff02::1), for periodic and solicited-from-:: use (no rate limit here)."""
        return self._ra_frame(ipv6.multicast_mac(ipv6.ALL_NODES), ipv6.ALL_NODES)

    def handle_icmpv6(self, eth_src: bytes, packet: Ipv6Packet, message: Icmpv6Message,
                      now: float, out: list[bytes]) -> None:
        """ICMPv6 handler entry point (types 133-137): append the reply, if any, to ``out``."""
        frame = self.reply(eth_src, packet, message, now)
        if frame is not None:
            out.append(frame)

    def handle(self, eth_src: bytes, packet: Ipv6Packet, now: float, out: list[bytes]) -> None:
        """IPv6 handler entry point (next header 58): parse ICMPv6, then :meth:`handle_icmpv6`."""
        self.handle_icmpv6(eth_src, packet, icmpv6.parse(packet), now, out)
