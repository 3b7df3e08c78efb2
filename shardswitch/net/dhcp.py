"""DHCPv4 server for the single guest behind a worker (RFC 2131/2132).

Theory of operation (as passt's dhcp.c): there is exactly one client and one
address to give it, so the server keeps no lease state at all.  Any worker
can answer any message, whichever queue the guest sent it on:

* DISCOVER -> OFFER of the configured address (or ACK right away when the
  client asks for Rapid Commit, RFC 4039);
* REQUEST -> ACK when the requested address (option 50, else ``ciaddr``) is
  the guest's address and the server identifier, if present, is ours;
  NAK otherwise;
* INFORM -> ACK with the configuration options but no address or lease time;
* RELEASE and DECLINE -> consumed without an answer (there is no other
  address to offer);
* anything else (BOOTREPLY, other message types, plain BOOTP without a
  DHCP message type) -> ``DHCP_IGNORED``; undecodable messages ->
  ``DHCP_MALFORMED``.

Messages are accepted up to :data:`MAX_REQUEST_LEN` bytes, and their options
are parsed defensively (:func:`parse_options`): pad and end, options
split over several instances (concatenated, RFC 3396) and option overload
into the ``file`` and ``sname`` fields (option 52) are supported; an option
running past its area is malformed.  The reply options (message type,
server identifier = gateway, lease time, subnet mask, router, DNS servers,
search domains (RFC 3397, with name compression), interface MTU, and a
classless static route to the gateway when it is outside the guest's subnet)
are encoded once at start-up.  The whole reply is kept within 576 bytes of
IPv4 datagram, which every client must accept (busybox udhcpc drops larger
ones), so search domains that do not fit are left out
(:attr:`DhcpServer.search_dropped`).  Replies are padded to the 300-byte
BOOTP minimum.

Addressing of replies follows RFC 2131 section 4.1: a NAK is broadcast; else
a client with ``ciaddr`` set gets a unicast to ``ciaddr``; else the
broadcast flag selects 255.255.255.255, and without it the reply is unicast
to ``yiaddr``.  The Ethernet destination is always the guest's MAC (the
source of its request), the IPv4 source is the gateway, ports are 67 -> 68.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from . import ipv4, udp
from .drop import DropReason, PacketError
from .ipv4 import Ipv4Packet
from .ndp import encode_dns_names
from .params import ParamsError, ResolvedParams
from .udp import UdpDatagram

#: UDP port of DHCP servers.
SERVER_PORT = 67
#: UDP port of DHCP clients.
CLIENT_PORT = 68
#: The DHCP magic cookie (99.130.83.99) in front of the options.
MAGIC_COOKIE = 0x63825363
#: op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
#: chaddr, sname, file, magic cookie.
FIXED = struct.Struct("!BBBBIHHIIII16s64s128sI")
#: Offset of the options (right after the magic cookie).
OPTIONS_OFFSET = FIXED.size
assert OPTIONS_OFFSET == 240
#: Offsets and lengths of the overloadable ``sname`` and ``file`` fields.
SNAME_OFFSET, SNAME_LEN = 44, 64
FILE_OFFSET, FILE_LEN = 108, 128
#: Smallest BOOTP message (RFC 951: 64-byte vendor area).
BOOTP_MIN_LEN = 300
#: Largest reply: 576-byte IPv4 datagram minus IPv4 and UDP headers.
MAX_REPLY_LEN = 576 - ipv4.IPV4_HLEN - udp.UDP_HLEN
#: Longest request accepted: what fits a 1500-byte IPv4 MTU.  Real clients
#: send 300-600 bytes; the cap bounds the per-option Python loop (a 64 KiB
#: message of empty options would take about 10 ms).
MAX_REQUEST_LEN = 1500 - ipv4.IPV4_HLEN - udp.UDP_HLEN
#: Room for options, end option included.
MAX_OPTIONS_LEN = MAX_REPLY_LEN - OPTIONS_OFFSET
#: Hardware type and address length of Ethernet.
HTYPE_ETHER = 1
HLEN_ETHER = 6
#: Longest value of one option instance.
MAX_OPTION_VALUE = 255
_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class BootOp(IntEnum):
    """BOOTP message op codes."""

    REQUEST = 1
    REPLY = 2


class BootFlags(IntFlag):
    """BOOTP flags."""

    BROADCAST = 0x8000


class MessageType(IntEnum):
    """DHCP message types (option 53)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Option(IntEnum):
    """DHCP option codes used here."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS_SERVERS = 6
    HOSTNAME = 12
    INTERFACE_MTU = 26
    REQUESTED_ADDRESS = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_LIST = 55
    MAX_MESSAGE_SIZE = 57
    CLIENT_ID = 61
    RAPID_COMMIT = 80
    CLIENT_FQDN = 81
    DOMAIN_SEARCH = 119
    CLASSLESS_ROUTES = 121
    END = 255


#: Client FQDN option flag E (RFC 4702 section 2.1): the name is in DNS wire format.
FQDN_FLAG_E = 0x04


class Overload(IntFlag):
    """Values of the option overload option (52)."""

    FILE = 1
    SNAME = 2


@dataclass(frozen=True, slots=True)
class DhcpMessage:
    """A decoded BOOTP/DHCP message (addresses as ints)."""

    op: int
    htype: int
    hlen: int
    xid: int
    secs: int
    flags: int
    ciaddr: int
    yiaddr: int
    siaddr: int
    giaddr: int
    #: All 16 bytes of the client hardware address field.
    chaddr: bytes
    #: The magic cookie word (options are parsed only when it is right).
    cookie: int
    #: Option code -> value (instances concatenated); empty without the cookie.
    options: dict[int, bytes]

    @property
    def message_type(self) -> int | None:
        """The DHCP message type, or None for plain BOOTP.

        Raises :class:`PacketError` when option 53 is not one byte long.
        """
        value = self.options.get(Option.MESSAGE_TYPE)
        if value is None:
            return None
        if len(value) != 1:
            raise PacketError(DropReason.DHCP_MALFORMED, f"message type of {len(value)} bytes")
        return value[0]

    def address_option(self, code: Option) -> int | None:
        """An option holding one IPv4 address, or None when absent.

        Raises :class:`PacketError` when its length is not 4.
        """
        value = self.options.get(code)
        if value is None:
            return None
        if len(value) != 4:
            raise PacketError(DropReason.DHCP_MALFORMED, f"option {code} of {len(value)} bytes")
        return int(_U32.unpack(value)[0])


def _scan_options(area: memoryview, into: dict[int, bytearray]) -> None:
    """Collect the options of one area into ``into``, concatenating repeats.

    Stops at the end option or at the end of the area (a missing end option
    is tolerated); an option whose length or value runs past the area is
    malformed.
    """
    i, size = 0, len(area)
    while i < size:
        code = area[i]
        if code == Option.PAD:
            i += 1
            continue
        if code == Option.END:
            return
        if i + 1 >= size:
            raise PacketError(DropReason.DHCP_MALFORMED, f"option {code} without a length")
        end = i + 2 + area[i + 1]
        if end > size:
            raise PacketError(DropReason.DHCP_MALFORMED, f"option {code} runs past its area")
        value = into.get(code)
        if value is None:
            into[code] = bytearray(area[i + 2:end])
        else:
            value += area[i + 2:end]
        i = end


def parse_options(message: memoryview) -> dict[int, bytes]:
    """Parse the options of a whole BOOTP message (cookie already checked).

    Honours option overload: the ``file`` field, then the ``sname`` field,
    are scanned after the options field when option 52 says so.
    """
    found: dict[int, bytearray] = {}
    _scan_options(message[OPTIONS_OFFSET:], found)
    overload = found.get(Option.OVERLOAD)
    if overload is not None:
        if len(overload) != 1 or not 1 <= overload[0] <= 3:
            raise PacketError(DropReason.DHCP_MALFORMED, f"overload option {bytes(overload)!r}")
        if overload[0] & Overload.FILE:
            _scan_options(message[FILE_OFFSET:FILE_OFFSET + FILE_LEN], found)
        if overload[0] & Overload.SNAME:
            _scan_options(message[SNAME_OFFSET:SNAME_OFFSET + SNAME_LEN], found)
    return {code: bytes(value) for code, value in found.items()}


def parse_message(payload: memoryview) -> DhcpMessage:
    """Decode a BOOTP/DHCP message; raises :class:`PacketError` (``DHCP_MALFORMED``)."""
    if not OPTIONS_OFFSET <= len(payload) <= MAX_REQUEST_LEN:
        raise PacketError(DropReason.DHCP_MALFORMED, f"{len(payload)}-byte message")
    (op, htype, hlen, _hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, _sname,
     _file, cookie) = FIXED.unpack_from(payload)
    options = parse_options(payload) if cookie == MAGIC_COOKIE else {}
    return DhcpMessage(op, htype, hlen, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr,
                       cookie, options)


def encode_option(code: int, value: bytes) -> bytes:
    """Encode one option, split into several instances when over 255 bytes (RFC 3396)."""
    if not value:
        return bytes((code, 0))
    return b"".join(bytes((code, len(chunk))) + chunk for chunk in
                    (value[i:i + MAX_OPTION_VALUE] for i in range(0, len(value), MAX_OPTION_VALUE)))


def encode_domain_search(names: tuple[str, ...] | list[str]) -> bytes:
    """Encode domain names for option 119 (RFC 1035 labels with compression, RFC 3397).

    Names must already be valid (see :func:`shardswitch.net.params.normalize_domain`).
    A suffix seen before is replaced by a pointer to its first occurrence.
    """
    out = bytearray()
    seen: dict[tuple[str, ...], int] = {}
    for name in names:
        labels = name.rstrip(".").split(".")
        for i in range(len(labels)):
            suffix = tuple(labels[i:])
            pointer = seen.get(suffix)
            if pointer is not None:
                out += _U16.pack(0xC000 | pointer)
                break
            if len(out) < 0x4000:
                seen[suffix] = len(out)
            label = labels[i].encode("ascii")
            out += _U8.pack(len(label)) + label
        else:
            out.append(0)
    return bytes(out)


def _address_option(code: Option, *addresses: int) -> bytes:
    """Encode an option whose value is a list of IPv4 addresses."""
    return encode_option(code, b"".join(_U32.pack(a) for a in addresses))


class DhcpServer:
    """The stateless DHCP server for one guest; option blocks are built once."""

    def __init__(self, params: ResolvedParams) -> None:
        """Pre-encode every option block; raises ParamsError if they cannot fit."""
        self._params = params
        self._server_id = _address_option(Option.SERVER_ID, params.gateway)
        self._lease = encode_option(Option.LEASE_TIME, _U32.pack(params.lease_time))
        fixed = [_address_option(Option.SUBNET_MASK, params.netmask),
                 _address_option(Option.ROUTER, params.gateway)]
        if params.offer_mtu:
            fixed.append(encode_option(Option.INTERFACE_MTU, _U16.pack(params.mtu)))
        if params.hostname:
            fixed.append(encode_option(Option.HOSTNAME, params.hostname))
        if params.fqdn:
            # RFC 4702: flags (E: the name is in DNS wire format), RCODE1 and RCODE2 (255, as passt), the name.
            fixed.append(encode_option(Option.CLIENT_FQDN, bytes((FQDN_FLAG_E, 255, 255))
                                       + encode_dns_names([params.fqdn])))
        if params.dns:
            fixed.append(_address_option(Option.DNS_SERVERS, *params.dns))
        if not params.gateway_on_link:
            # RFC 3442 routes: the gateway itself (/32, on link), then default via it.
            fixed.append(encode_option(Option.CLASSLESS_ROUTES,
                                       _U8.pack(32) + _U32.pack(params.gateway) + _U32.pack(0)
                                       + _U8.pack(0) + _U32.pack(params.gateway)))
        config = b"".join(fixed)
        # Longest reply: type, server id, lease, config, rapid commit, end.
        room = MAX_OPTIONS_LEN - (3 + len(self._server_id) + len(self._lease) + len(config) + 2 + 1)
        if room < 0:
            raise ParamsError("DHCP options (too many DNS servers?) exceed a 576-byte reply")
        kept = len(params.search)
        while kept and len(self._search_option(params.search[:kept])) > room:
            kept -= 1
        self._config = config + self._search_option(params.search[:kept])
        #: Search domains left out of replies for lack of room (for the caller to log).
        self.search_dropped: tuple[str, ...] = params.search[kept:]

    @staticmethod
    def _search_option(names: tuple[str, ...]) -> bytes:
        """Option 119 for ``names``, or nothing when there are none."""
        return encode_option(Option.DOMAIN_SEARCH, encode_domain_search(names)) if names else b""

    def respond(self, payload: memoryview) -> tuple[bytes, int] | None:
        """Answer one message from the client: ``(BOOTP reply, IPv4 destination)``.

        Returns None when the message is consumed without an answer; raises
        :class:`PacketError` (``DHCP_MALFORMED``, ``DHCP_IGNORED``).
        """
        msg = parse_message(payload)
        if msg.op != BootOp.REQUEST:
            raise PacketError(DropReason.DHCP_IGNORED, f"op {msg.op}")
        if msg.htype != HTYPE_ETHER or msg.hlen != HLEN_ETHER:
            raise PacketError(DropReason.DHCP_MALFORMED, f"hardware {msg.htype}/{msg.hlen}")
        if msg.cookie != MAGIC_COOKIE:
            raise PacketError(DropReason.DHCP_IGNORED, "BOOTP without the DHCP cookie")
        kind = msg.message_type
        address = self._params.address
        if kind == MessageType.DISCOVER:
            if Option.RAPID_COMMIT in msg.options:
                return self._reply(msg, MessageType.ACK, address, rapid_commit=True)
            return self._reply(msg, MessageType.OFFER, address)
        if kind == MessageType.REQUEST:
            server_id = msg.address_option(Option.SERVER_ID)
            requested = msg.address_option(Option.REQUESTED_ADDRESS)
            if requested is None:
                requested = msg.ciaddr
            if (server_id is not None and server_id != self._params.gateway) or requested != address:
                return self._reply(msg, MessageType.NAK, 0)
            return self._reply(msg, MessageType.ACK, address)
        if kind == MessageType.INFORM:
            return self._reply(msg, MessageType.ACK, 0)
        if kind in (MessageType.RELEASE, MessageType.DECLINE):
            return None
        raise PacketError(DropReason.DHCP_IGNORED, f"message type {kind}")

    def _reply(self, msg: DhcpMessage, kind: MessageType, yiaddr: int, *,
               rapid_commit: bool = False) -> tuple[bytes, int]:
        """Build the reply of type ``kind`` to ``msg`` and choose its destination."""
        parts = [bytes((Option.MESSAGE_TYPE, 1, kind)), self._server_id]
        if kind != MessageType.NAK:
            if yiaddr:
                parts.append(self._lease)  # not for INFORM (RFC 2131 table 3)
            parts.append(self._config)
        if rapid_commit:
            parts.append(encode_option(Option.RAPID_COMMIT, b""))
        parts.append(bytes((Option.END,)))
        ciaddr = msg.ciaddr if kind == MessageType.ACK else 0
        fixed = FIXED.pack(BootOp.REPLY, HTYPE_ETHER, HLEN_ETHER, 0, msg.xid, 0, msg.flags,
                           ciaddr, yiaddr, 0, msg.giaddr, msg.chaddr, b"", b"", MAGIC_COOKIE)
        body = b"".join((fixed, *parts))
        if len(body) < BOOTP_MIN_LEN:
            body += bytes(BOOTP_MIN_LEN - len(body))
        if kind == MessageType.NAK:
            dst = ipv4.BROADCAST
        elif msg.ciaddr:
            dst = msg.ciaddr
        elif msg.flags & BootFlags.BROADCAST or not yiaddr:
            dst = ipv4.BROADCAST
        else:
            dst = yiaddr
        return body, dst

    def handle_udp(self, eth_src: bytes, packet: Ipv4Packet, datagram: UdpDatagram, now: float,
                   out: list[bytes]) -> None:
        """UDP handler entry point (port 67): append the reply frame, if any, to ``out``."""
        answer = self.respond(datagram.payload)
        if answer is not None:
            body, dst = answer
            out.append(udp.build_frame(eth_src, self._params.our_mac, self._params.gateway, dst,
                                       SERVER_PORT, CLIENT_PORT, body))
