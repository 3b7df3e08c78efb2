"""DHCPv6 server for the single guest behind a worker (RFC 8415), as passt's dhcpv6.c.

Theory of operation: there is one client and one address to give it (the
configured ``address6``), so, like the DHCPv4 server of
:mod:`shardswitch.net.dhcp`, this server keeps no binding state at all and
any worker answers any message.  Everything that does not depend on the
request (our Server Identifier, the IA Address option for ``address6``, the
DNS Recursive Name Server (23) and Domain Search List (24) options, the
status code options) is encoded once at start-up.

Requests come to UDP port 547, from a link-local source, sent to
All_DHCP_Relay_Agents_and_Servers (ff02::1:2) or to our link-local address
(:attr:`~shardswitch.net.params.ResolvedParams.router_ll6`, the source of
our RAs, or :attr:`~shardswitch.net.params.ResolvedParams.our_ll6`); others
are ``DHCPV6_IGNORED``.  A message is 4 to :data:`MAX_MESSAGE_LEN` bytes
(what fits a 1500-byte MTU; the bound also bounds the per-option loop).  Its
options are parsed defensively (:func:`parse_options`): every option header
and value must lie inside the message (or, for the options of an IA, inside
the IA), options this server reads have their RFC lengths (DUIDs of 3 to 130
bytes, IA_NA and IA_PD of at least 12 bytes, IA_TA of at least 4, IA Address
of at least 24, Rapid Commit empty, ...), the options RFC 8415 section 21.1
allows once (Client and Server Identifier, Option Request, Elapsed Time,
Rapid Commit, Reconfigure Accept, Preference) appear once, and no two IAs of
one type share an IAID; anything else is ``DHCPV6_MALFORMED``.  Options the
server does not know are skipped.  Only client messages are looked at:
Advertise, Reply, Reconfigure, relay messages and unknown types are
``DHCPV6_IGNORED`` before their options are parsed.

Validation follows RFC 8415 section 16: every message but
Information-request needs a Client Identifier; Solicit, Confirm and Rebind
must not carry a Server Identifier; Request, Renew, Release and Decline
must carry one; an Information-request must carry no IA.  Breaking one of
these rules is ``DHCPV6_MALFORMED``; a Server Identifier that is not ours
(Request, Renew, Release, Decline, Information-request) means the message
is for another server: ``DHCPV6_IGNORED``.  Without ``address6`` the server
answers Information-requests only and ignores the rest (passt answers
nothing without an address to give; the RA then has no M flag anyway).

Answers (message type, transaction ID echoed; Client Identifier echoed,
our Server Identifier, a DUID-LL of our MAC):

* Solicit -> Advertise with Preference 255 (we are the only server: the
  client need not wait for others), or, when the client sent Rapid Commit,
  Reply with Rapid Commit;
* Request, Renew, Rebind -> Reply;
* the IAs of those four: each IA_NA gets ``address6`` with infinite
  preferred and valid lifetimes and T1 = T2 = infinity (the address never
  changes while we run, as in passt); in a Request, an IA_NA holding an
  address outside the advertised /64 gets Status Code NotOnLink instead
  (RFC 8415 18.3.2); in a Renew or Rebind, addresses the client lists that
  are not ``address6`` are returned with lifetimes 0 (18.3.4, 18.3.5).
  There are no temporary addresses and no delegated prefixes: an IA_TA gets
  NoAddrsAvail, an IA_PD NoPrefixAvail, inside the IA;
* the same four and Information-request also get the DNS servers and search
  domains (RFC 1035 labels, uncompressed, as RFC 8415 section 10 wants);
* Confirm -> Reply with Status Code Success when every address it lists is
  in the advertised /64, NotOnLink otherwise, and no reply (RFC 8415
  18.3.3) when it lists none (``DHCPV6_IGNORED``);
* Release and Decline -> Reply with Status Code Success (there is nothing
  to free or mark, but the client waits for that Reply);
* Information-request -> Reply with the configuration options, no IA.

Replies are kept within :data:`MAX_REPLY_LEN` bytes (a 1280-byte IPv6
packet): the configuration options are sized at start-up so that a reply
with the longest client DUID, Rapid Commit and :data:`RESERVED_IAS` IA_NAs
always fits (too many DNS servers raise :class:`ParamsError`; search
domains that do not fit are left out, :attr:`Dhcpv6Server.search_dropped`).
A request whose answer would still be larger (dozens of IAs) is
``DHCPV6_MALFORMED``.  Reply frames go to the guest's MAC from ours, from
our link-local address to the client's address, UDP 547 -> 546, hop limit
64, with a UDP checksum.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from . import ipv6, udp
from .drop import DropReason, PacketError
from .ipv6 import Ipv6Packet
from .ndp import SLAAC_PREFIX_LEN, encode_dns_names
from .params import MIN_MTU6, ParamsError, ResolvedParams
from .udp import UdpDatagram

#: UDP port of DHCPv6 servers and relay agents.
SERVER_PORT = 547
#: UDP port of DHCPv6 clients.
CLIENT_PORT = 546
#: All_DHCP_Relay_Agents_and_Servers (ff02::1:2), where clients send.
ALL_DHCP_RELAY_AGENTS_AND_SERVERS = bytes.fromhex("ff020000000000000000000000010002")
#: Message type (top 8 bits) and transaction ID (low 24 bits).
HEADER = struct.Struct("!I")
MESSAGE_HLEN = HEADER.size
#: Option code and option length.
OPTION_HEADER = struct.Struct("!HH")
OPTION_HLEN = OPTION_HEADER.size
#: Longest message accepted: what fits a 1500-byte MTU.
MAX_MESSAGE_LEN = 1500 - ipv6.IPV6_HLEN - udp.UDP_HLEN
#: Longest reply: what fits the IPv6 minimum MTU.
MAX_REPLY_LEN = MIN_MTU6 - ipv6.IPV6_HLEN - udp.UDP_HLEN
#: DUID lengths: a 2-byte type and 1 to 128 bytes (RFC 8415 11.1).
MIN_DUID_LEN = 3
MAX_DUID_LEN = 130
#: IA_NA and IA_PD: IAID, T1, T2.
IA_NA_FIXED = struct.Struct("!III")
#: IA_TA: IAID.
IA_TA_FIXED = struct.Struct("!I")
#: IA Address: address, preferred lifetime, valid lifetime.
IAADDR_FIXED = struct.Struct("!16sII")
#: IA Prefix: preferred lifetime, valid lifetime, prefix length, prefix.
IAPREFIX_FIXED = struct.Struct("!IIB16s")
#: DUID-LL: DUID type, hardware type, link-layer address.
DUID_LL = struct.Struct("!HH6s")
#: Status Code option: code (a message follows).
STATUS_FIXED = struct.Struct("!H")
#: Elapsed Time option value.
ELAPSED_TIME_LEN = 2
#: "Infinity" for T1, T2 and lifetimes.
INFINITY = 0xFFFFFFFF
#: Preference we advertise: the highest (the client may proceed at once).
MAX_PREFERENCE = 255
#: IA_NAs every reply has room for (see the budget in :class:`Dhcpv6Server`).
RESERVED_IAS = 2


class MessageType(IntEnum):
    """DHCPv6 message types (RFC 8415 section 7.3)."""

    SOLICIT = 1
    ADVERTISE = 2
    REQUEST = 3
    CONFIRM = 4
    RENEW = 5
    REBIND = 6
    REPLY = 7
    RELEASE = 8
    DECLINE = 9
    RECONFIGURE = 10
    INFORMATION_REQUEST = 11
    RELAY_FORW = 12
    RELAY_REPL = 13


class OptionCode(IntEnum):
    """DHCPv6 option codes used here (RFC 8415 section 21, RFC 3646)."""

    CLIENTID = 1
    SERVERID = 2
    IA_NA = 3
    IA_TA = 4
    IAADDR = 5
    ORO = 6
    PREFERENCE = 7
    ELAPSED_TIME = 8
    STATUS_CODE = 13
    RAPID_COMMIT = 14
    RECONF_ACCEPT = 20
    DNS_SERVERS = 23
    DOMAIN_LIST = 24
    IA_PD = 25
    IAPREFIX = 26
    CLIENT_FQDN = 39


class FqdnFlag(IntFlag):
    """Client FQDN option flags (RFC 4704 section 4.1)."""

    #: Client: the server should update the AAAA record.
    S = 0x01
    #: Server: it overrode the client's S flag (it will not update it).
    O = 0x02


class StatusCode(IntEnum):
    """Status Code option values (RFC 8415 section 21.13)."""

    SUCCESS = 0
    UNSPEC_FAIL = 1
    NO_ADDRS_AVAIL = 2
    NO_BINDING = 3
    NOT_ON_LINK = 4
    USE_MULTICAST = 5
    NO_PREFIX_AVAIL = 6


class DuidType(IntEnum):
    """DUID types (RFC 8415 section 11)."""

    LLT = 1
    EN = 2
    LL = 3
    UUID = 4


class HardwareType(IntEnum):
    """IANA hardware types used in DUIDs."""

    ETHERNET = 1


class ServerIdRule(IntEnum):
    """What RFC 8415 section 16 says about a Server Identifier in a client message."""

    FORBIDDEN = 0
    REQUIRED = 1
    OPTIONAL = 2


#: Client message type -> (Client Identifier required, Server Identifier rule).
RULES: dict[int, tuple[bool, ServerIdRule]] = {
    MessageType.SOLICIT: (True, ServerIdRule.FORBIDDEN),
    MessageType.REQUEST: (True, ServerIdRule.REQUIRED),
    MessageType.CONFIRM: (True, ServerIdRule.FORBIDDEN),
    MessageType.RENEW: (True, ServerIdRule.REQUIRED),
    MessageType.REBIND: (True, ServerIdRule.FORBIDDEN),
    MessageType.RELEASE: (True, ServerIdRule.REQUIRED),
    MessageType.DECLINE: (True, ServerIdRule.REQUIRED),
    MessageType.INFORMATION_REQUEST: (False, ServerIdRule.OPTIONAL),
}
#: Options a message may carry once (RFC 8415 section 21.1), of those read or checked here.
SINGLETONS = frozenset((OptionCode.CLIENTID, OptionCode.SERVERID, OptionCode.ORO,
                        OptionCode.PREFERENCE, OptionCode.ELAPSED_TIME, OptionCode.RAPID_COMMIT,
                        OptionCode.RECONF_ACCEPT))
#: The Identity Association options.
IA_OPTIONS = frozenset((OptionCode.IA_NA, OptionCode.IA_TA, OptionCode.IA_PD))
#: Text of the Status Code options we send.
STATUS_MESSAGES = {
    StatusCode.SUCCESS: "success",
    StatusCode.NO_ADDRS_AVAIL: "no addresses available",
    StatusCode.NOT_ON_LINK: "address not on link",
    StatusCode.NO_PREFIX_AVAIL: "no prefixes available",
}
_U8 = struct.Struct("!B")
_U32 = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class IdentityAssociation:
    """One IA_NA, IA_TA or IA_PD of a client message."""

    #: :attr:`OptionCode.IA_NA`, :attr:`OptionCode.IA_TA` or :attr:`OptionCode.IA_PD`.
    option: int
    #: The client's identifier of the IA.
    iaid: int
    #: The addresses of its IA Address options (none for IA_PD).
    addresses: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Dhcpv6Message:
    """A decoded client message: what the server needs of it."""

    #: Message type (a key of :data:`RULES`).
    type: int
    #: Transaction ID (24 bits).
    xid: int
    #: The client's DUID, or None without a Client Identifier.
    client_id: bytes | None
    #: The DUID of the Server Identifier, or None without one.
    server_id: bytes | None
    #: The client asked for Rapid Commit.
    rapid_commit: bool
    #: The IAs, in message order.
    ias: tuple[IdentityAssociation, ...]
    #: The client asked the server to update the AAAA record (the S flag of its Client FQDN option).
    fqdn_s: bool = False


def parse_options(area: memoryview) -> list[tuple[int, memoryview]]:
    """Split an option area into ``(code, value)``; raises ``DHCPV6_MALFORMED`` when one runs past it."""
    options = []
    offset, size = 0, len(area)
    while offset < size:
        if offset + OPTION_HLEN > size:
            raise PacketError(DropReason.DHCPV6_MALFORMED, f"option header truncated at {offset}")
        code, length = OPTION_HEADER.unpack_from(area, offset)
        end = offset + OPTION_HLEN + length
        if end > size:
            raise PacketError(DropReason.DHCPV6_MALFORMED,
                              f"option {code} of {length} bytes at {offset} runs past {size}")
        options.append((code, area[offset + OPTION_HLEN:end]))
        offset = end
    return options


def _check_length(code: int, value: memoryview, minimum: int, maximum: int | None = None) -> None:
    """Raise ``DHCPV6_MALFORMED`` unless ``minimum <= len(value) <= maximum`` (no maximum: None)."""
    length = len(value)
    if length < minimum or maximum is not None and length > maximum:
        raise PacketError(DropReason.DHCPV6_MALFORMED, f"option {code} of {length} bytes")


def _parse_ia(code: int, value: memoryview) -> IdentityAssociation:
    """Decode an IA_NA, IA_TA or IA_PD option value, checking its own options."""
    fixed = IA_TA_FIXED.size if code == OptionCode.IA_TA else IA_NA_FIXED.size
    _check_length(code, value, fixed)
    addresses = []
    for sub, data in parse_options(value[fixed:]):
        if sub == OptionCode.IAADDR and code != OptionCode.IA_PD:
            _check_length(sub, data, IAADDR_FIXED.size)
            parse_options(data[IAADDR_FIXED.size:])
            addresses.append(bytes(data[:ipv6.IPV6_ALEN]))
        elif sub == OptionCode.IAPREFIX and code == OptionCode.IA_PD:
            _check_length(sub, data, IAPREFIX_FIXED.size)
            parse_options(data[IAPREFIX_FIXED.size:])
    return IdentityAssociation(code, int(_U32.unpack_from(value)[0]), tuple(addresses))


def parse_message(payload: memoryview) -> Dhcpv6Message:
    """Decode a client message; raises :class:`PacketError` (``DHCPV6_MALFORMED``, ``DHCPV6_IGNORED``).

    Message types other than client messages are ignored before their
    options are parsed (relay messages have another layout).
    """
    size = len(payload)
    if not MESSAGE_HLEN <= size <= MAX_MESSAGE_LEN:
        raise PacketError(DropReason.DHCPV6_MALFORMED, f"{size}-byte message")
    first = int(HEADER.unpack_from(payload)[0])
    kind, xid = first >> 24, first & 0xFFFFFF
    if kind not in RULES:
        raise PacketError(DropReason.DHCPV6_IGNORED, f"message type {kind}")
    seen: set[int] = set()
    client_id = server_id = None
    rapid_commit = fqdn_s = False
    ias: list[IdentityAssociation] = []
    iaids: set[tuple[int, int]] = set()
    for code, value in parse_options(payload[MESSAGE_HLEN:]):
        if code in SINGLETONS:
            if code in seen:
                raise PacketError(DropReason.DHCPV6_MALFORMED, f"option {code} twice")
            seen.add(code)
        if code in (OptionCode.CLIENTID, OptionCode.SERVERID):
            _check_length(code, value, MIN_DUID_LEN, MAX_DUID_LEN)
            if code == OptionCode.CLIENTID:
                client_id = bytes(value)
            else:
                server_id = bytes(value)
        elif code in (OptionCode.RAPID_COMMIT, OptionCode.RECONF_ACCEPT):
            _check_length(code, value, 0, 0)
            rapid_commit = rapid_commit or code == OptionCode.RAPID_COMMIT
        elif code == OptionCode.ELAPSED_TIME:
            _check_length(code, value, ELAPSED_TIME_LEN, ELAPSED_TIME_LEN)
        elif code == OptionCode.CLIENT_FQDN:
            _check_length(code, value, 1)
            fqdn_s = bool(value[0] & FqdnFlag.S)
        elif code == OptionCode.ORO and len(value) % 2:
            raise PacketError(DropReason.DHCPV6_MALFORMED, f"option request of {len(value)} bytes")
        elif code in IA_OPTIONS:
            ia = _parse_ia(code, value)
            if (code, ia.iaid) in iaids:
                raise PacketError(DropReason.DHCPV6_MALFORMED, f"IAID {ia.iaid:#x} twice in option {code}")
            iaids.add((code, ia.iaid))
            ias.append(ia)
    return Dhcpv6Message(kind, xid, client_id, server_id, rapid_commit, tuple(ias), fqdn_s)


def encode_option(code: int, value: bytes) -> bytes:
    """One option: code, length, value (values here are far below 65535 bytes)."""
    return OPTION_HEADER.pack(code, len(value)) + value


def duid_ll(mac: bytes) -> bytes:
    """The DUID-LL (type 3, Ethernet) of ``mac``."""
    return DUID_LL.pack(DuidType.LL, HardwareType.ETHERNET, mac)


def status_option(code: StatusCode) -> bytes:
    """A Status Code option with our message for ``code``."""
    return encode_option(OptionCode.STATUS_CODE,
                         STATUS_FIXED.pack(code) + STATUS_MESSAGES[code].encode("utf-8"))


class Dhcpv6Server:
    """The stateless DHCPv6 server for one guest; everything but the echoed parts is built once."""

    def __init__(self, params: ResolvedParams) -> None:
        """Pre-encode the options; raises ParamsError when the IPv6 DNS servers cannot fit a reply."""
        self._our_mac = params.our_mac
        self._address = params.address6
        self._prefix = (ipv6.prefix_of(params.address6, SLAAC_PREFIX_LEN)
                        if params.address6 is not None else None)
        #: Source of our replies (link-local; the same as our RAs').
        self.source = params.router_ll6
        self._destinations = frozenset((ALL_DHCP_RELAY_AGENTS_AND_SERVERS, params.router_ll6,
                                        params.our_ll6))
        #: Our DUID (DUID-LL of our MAC).
        self.duid = duid_ll(params.our_mac)
        self._server_id = encode_option(OptionCode.SERVERID, self.duid)
        self._status = {code: status_option(code) for code in STATUS_MESSAGES}
        self._iaaddr = (encode_option(OptionCode.IAADDR, IAADDR_FIXED.pack(params.address6, INFINITY,
                                                                           INFINITY))
                        if params.address6 is not None else b"")
        self._preference = encode_option(OptionCode.PREFERENCE, _U8.pack(MAX_PREFERENCE))
        self._rapid_commit = encode_option(OptionCode.RAPID_COMMIT, b"")
        longest_ia = (OPTION_HLEN + IA_NA_FIXED.size + 2 * (OPTION_HLEN + IAADDR_FIXED.size)
                      + max(map(len, self._status.values())))
        #: The Client FQDN option's name (RFC 4704), without its flags byte; empty: none.
        self._fqdn = encode_dns_names([params.fqdn]) if params.fqdn else b""
        fqdn_len = OPTION_HLEN + 1 + len(self._fqdn) if self._fqdn else 0
        reserved = (MESSAGE_HLEN + OPTION_HLEN + MAX_DUID_LEN + len(self._server_id)
                    + len(self._preference) + len(self._rapid_commit) + RESERVED_IAS * longest_ia + fqdn_len)
        dns = (encode_option(OptionCode.DNS_SERVERS, b"".join(params.dns6)) if params.dns6 else b"")
        room = MAX_REPLY_LEN - reserved - len(dns)
        if room < 0:
            raise ParamsError(f"DHCPv6 DNS servers option of {len(dns)} bytes (too many IPv6 DNS "
                              f"servers?) does not fit a {MAX_REPLY_LEN}-byte reply")
        kept = len(params.search)
        while kept and len(self._search_option(params.search[:kept])) > room:
            kept -= 1
        self._config = dns + self._search_option(params.search[:kept])
        #: Search domains left out of replies for lack of room (for the caller to log).
        self.search_dropped: tuple[str, ...] = params.search[kept:]

    @staticmethod
    def _search_option(names: tuple[str, ...]) -> bytes:
        """The Domain Search List option for ``names``, or nothing when there are none."""
        return encode_option(OptionCode.DOMAIN_LIST, encode_dns_names(names)) if names else b""

    def _on_link(self, address: bytes) -> bool:
        """True when ``address`` is inside the /64 we advertise."""
        return ipv6.prefix_of(address, SLAAC_PREFIX_LEN) == self._prefix

    def respond(self, payload: memoryview) -> bytes:
        """The reply (DHCPv6 message, UDP payload) to one client message.

        Raises :class:`PacketError` (``DHCPV6_MALFORMED``, ``DHCPV6_IGNORED``)
        for messages that get no answer.
        """
        msg = parse_message(payload)
        kind = msg.type
        client_required, server_rule = RULES[kind]
        if client_required and msg.client_id is None:
            raise PacketError(DropReason.DHCPV6_MALFORMED, f"message type {kind} without a client identifier")
        if server_rule == ServerIdRule.REQUIRED and msg.server_id is None:
            raise PacketError(DropReason.DHCPV6_MALFORMED, f"message type {kind} without a server identifier")
        if server_rule == ServerIdRule.FORBIDDEN and msg.server_id is not None:
            raise PacketError(DropReason.DHCPV6_MALFORMED, f"message type {kind} with a server identifier")
        if msg.server_id is not None and msg.server_id != self.duid:
            raise PacketError(DropReason.DHCPV6_IGNORED, "another server's identifier")
        if kind == MessageType.INFORMATION_REQUEST:
            if msg.ias:
                raise PacketError(DropReason.DHCPV6_MALFORMED, "information request with an IA")
            return self._reply(msg, MessageType.REPLY, b"")
        if self._address is None:
            raise PacketError(DropReason.DHCPV6_IGNORED, "no IPv6 address to give")
        if kind == MessageType.CONFIRM:
            addresses = [a for ia in msg.ias for a in ia.addresses]
            if not addresses:
                raise PacketError(DropReason.DHCPV6_IGNORED, "confirm without addresses")
            code = StatusCode.SUCCESS if all(map(self._on_link, addresses)) else StatusCode.NOT_ON_LINK
            return self._reply(msg, MessageType.REPLY, self._status[code], config=False)
        if kind in (MessageType.RELEASE, MessageType.DECLINE):
            return self._reply(msg, MessageType.REPLY, self._status[StatusCode.SUCCESS], config=False)
        ias = b"".join(self._ia_reply(ia, kind) for ia in msg.ias)
        if kind == MessageType.SOLICIT:
            if msg.rapid_commit:
                return self._reply(msg, MessageType.REPLY, self._rapid_commit + ias)
            return self._reply(msg, MessageType.ADVERTISE, self._preference + ias)
        return self._reply(msg, MessageType.REPLY, ias)

    def _ia_reply(self, ia: IdentityAssociation, kind: int) -> bytes:
        """Our answer to one IA of a Solicit, Request, Renew or Rebind."""
        if ia.option == OptionCode.IA_TA:
            return encode_option(ia.option, IA_TA_FIXED.pack(ia.iaid) + self._status[StatusCode.NO_ADDRS_AVAIL])
        if ia.option == OptionCode.IA_PD:
            return encode_option(ia.option, IA_NA_FIXED.pack(ia.iaid, 0, 0)
                                 + self._status[StatusCode.NO_PREFIX_AVAIL])
        if kind == MessageType.REQUEST and not all(map(self._on_link, ia.addresses)):
            return encode_option(ia.option, IA_NA_FIXED.pack(ia.iaid, 0, 0) + self._status[StatusCode.NOT_ON_LINK])
        parts = [IA_NA_FIXED.pack(ia.iaid, INFINITY, INFINITY), self._iaaddr]
        if kind in (MessageType.RENEW, MessageType.REBIND):
            parts += [encode_option(OptionCode.IAADDR, IAADDR_FIXED.pack(address, 0, 0))
                      for address in dict.fromkeys(ia.addresses) if address != self._address]
        return encode_option(ia.option, b"".join(parts))

    def _reply(self, msg: Dhcpv6Message, kind: MessageType, middle: bytes, *, config: bool = True) -> bytes:
        """Header, identifiers, ``middle`` and (with ``config``) the DNS options; refuses an oversized reply."""
        client = encode_option(OptionCode.CLIENTID, msg.client_id) if msg.client_id is not None else b""
        fqdn = b""
        if config and self._fqdn:
            # As passt: O when the client asked us (S) to update its AAAA record, which we never do.
            fqdn = encode_option(OptionCode.CLIENT_FQDN,
                                 bytes((FqdnFlag.O if msg.fqdn_s else 0,)) + self._fqdn)
        body = b"".join((HEADER.pack(kind << 24 | msg.xid), client, self._server_id, middle,
                         self._config if config else b"", fqdn))
        if len(body) > MAX_REPLY_LEN:
            raise PacketError(DropReason.DHCPV6_MALFORMED, f"reply of {len(body)} bytes")
        return body

    def handle_udp(self, eth_src: bytes, packet: Ipv6Packet, datagram: UdpDatagram, now: float,
                   out: list[bytes]) -> None:
        """UDP-over-IPv6 handler entry point (port 547): append the reply frame to ``out``."""
        if not ipv6.is_link_local(packet.src):
            raise PacketError(DropReason.DHCPV6_IGNORED, f"source {ipv6.addr_to_str(packet.src)}")
        if packet.dst not in self._destinations:
            raise PacketError(DropReason.DHCPV6_IGNORED, f"destination {ipv6.addr_to_str(packet.dst)}")
        body = self.respond(datagram.payload)
        out.append(udp.build_frame6(eth_src, self._our_mac, self.source, packet.src, SERVER_PORT, CLIENT_PORT,
                                    body))
