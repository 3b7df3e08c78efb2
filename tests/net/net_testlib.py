"""Independent packet helpers for the shardswitch.net tests.

Nothing here imports the code under test: checksums follow RFC 1071 word by
word, frames are packed with their own struct formats, and the DHCP test
client decodes replies as strictly as busybox udhcpc does.  That way a bug
shared by builder and parser cannot hide itself.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from enum import Enum

OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST_MAC = bytes.fromhex("525400123456")
BROADCAST_MAC = b"\xff" * 6


def ip(text: str) -> bytes:
    """Dotted quad to 4 bytes."""
    return socket.inet_aton(text)


def rfc1071(data: bytes) -> int:
    """Reference Internet checksum: 16-bit words, end-around carry, complement."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth_frame(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame."""
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4_packet(src: bytes, dst: bytes, proto: int, payload: bytes, *, options: bytes = b"",
                frag: int = 0, ttl: int = 64, good_checksum: bool = True) -> bytes:
    """An IPv4 packet with a correct (or deliberately wrong) header checksum."""
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 0x1234, frag,
                         ttl, proto, 0, src, dst) + options
    csum = rfc1071(header)
    if not good_checksum:
        csum ^= 0x0101
    return header[:10] + struct.pack("!H", csum) + header[12:] + payload


def udp_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, *,
                 checksum: bool = True) -> bytes:
    """A UDP datagram with its pseudo-header checksum (or 0 when ``checksum`` is False)."""
    length = 8 + len(payload)
    header = struct.pack("!HHHH", sport, dport, length, 0)
    if not checksum:
        return header + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 17, length)
    csum = rfc1071(pseudo + header + payload) or 0xFFFF
    return header[:6] + struct.pack("!H", csum) + payload


def udp_frame(src_ip: bytes, dst_ip: bytes, sport: int, dport: int, payload: bytes, *,
              eth_dst: bytes = BROADCAST_MAC, eth_src: bytes = GUEST_MAC) -> bytes:
    """A complete guest frame carrying a UDP datagram."""
    return eth_frame(eth_dst, eth_src, 0x0800,
                     ipv4_packet(src_ip, dst_ip, 17,
                                 udp_datagram(src_ip, dst_ip, sport, dport, payload)))


def arp_frame(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes, *,
              eth_dst: bytes = BROADCAST_MAC, eth_src: bytes = GUEST_MAC) -> bytes:
    """A complete Ethernet/IPv4 ARP frame."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, spa, tha, tpa)
    return eth_frame(eth_dst, eth_src, 0x0806, body)


@dataclass
class ArpReply:
    """A decoded ARP frame."""

    eth_dst: bytes
    eth_src: bytes
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def decode_arp_frame(frame: bytes) -> ArpReply:
    """Decode an Ethernet/IPv4 ARP frame, asserting its fixed fields."""
    dst, src, ethertype = struct.unpack_from("!6s6sH", frame)
    assert ethertype == 0x0806
    hrd, pro, hln, pln, op, sha, spa, tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
    assert (hrd, pro, hln, pln) == (1, 0x0800, 6, 4)
    return ArpReply(dst, src, op, sha, spa, tha, tpa)


@dataclass
class UdpReply:
    """A decoded, fully checked Ethernet/IPv4/UDP frame."""

    eth_dst: bytes
    eth_src: bytes
    ip_src: bytes
    ip_dst: bytes
    ttl: int
    sport: int
    dport: int
    payload: bytes


def decode_udp_frame(frame: bytes) -> UdpReply:
    """Decode a frame as strictly as udhcpc: no options, exact lengths, both checksums."""
    dst, src, ethertype = struct.unpack_from("!6s6sH", frame)
    assert ethertype == 0x0800
    packet = frame[14:]
    ver_ihl, _tos, total, _ident, frag, ttl, proto, _csum, ip_src, ip_dst = struct.unpack_from(
        "!BBHHHBBH4s4s", packet)
    assert ver_ihl == 0x45, "udhcpc wants version 4, IHL 5"
    assert total == len(packet), "no trailing bytes"
    assert rfc1071(packet[:20]) == 0, "IPv4 header checksum"
    assert frag & 0x3FFF == 0, "not a fragment"
    assert proto == 17
    sport, dport, length, csum = struct.unpack_from("!HHHH", packet, 20)
    assert length == total - 20, "UDP length equals the IPv4 payload"
    assert csum != 0, "we always send UDP checksums"
    pseudo = ip_src + ip_dst + struct.pack("!BBH", 0, 17, length)
    assert rfc1071(pseudo + packet[20:]) == 0, "UDP checksum"
    return UdpReply(dst, src, ip_src, ip_dst, ttl, sport, dport, packet[28:])


# --- DHCP -------------------------------------------------------------------------------

DHCP_FIXED = "!BBBBIHHIIII16s64s128sI"
MAGIC = 0x63825363


def dhcp_options(*items: tuple[int, bytes]) -> bytes:
    """Encode options (no splitting) followed by the end option."""
    return b"".join(bytes((code, len(value))) + value for code, value in items) + b"\xff"


def dhcp_message(*, op: int = 1, htype: int = 1, hlen: int = 6, xid: int = 0x1234ABCD,
                 flags: int = 0, ciaddr: bytes = bytes(4), chaddr: bytes = GUEST_MAC,
                 sname: bytes = b"", file: bytes = b"", cookie: int = MAGIC,
                 options: bytes = b"\xff", pad_to: int = 300) -> bytes:
    """A BOOTP/DHCP message padded to ``pad_to`` bytes."""
    fixed = struct.pack(DHCP_FIXED, op, htype, hlen, 0, xid, 0, flags,
                        int.from_bytes(ciaddr, "big"), 0, 0, 0, chaddr, sname, file, cookie)
    body = fixed + options
    return body + bytes(max(0, pad_to - len(body)))


@dataclass
class DhcpReply:
    """A decoded DHCP reply: fixed fields and options (repeats concatenated)."""

    udp: UdpReply
    op: int
    xid: int
    flags: int
    ciaddr: bytes
    yiaddr: bytes
    siaddr: bytes
    giaddr: bytes
    chaddr: bytes
    options: dict[int, bytes]
    option_order: list[int]

    @property
    def message_type(self) -> int:
        """Option 53."""
        return self.options[53][0]


def decode_dhcp_reply(frame: bytes) -> DhcpReply:
    """Decode a DHCP reply frame; checks sizes, ports, cookie and option syntax."""
    udp = decode_udp_frame(frame)
    assert (udp.sport, udp.dport) == (67, 68)
    body = udp.payload
    assert 300 <= len(body) <= 548, f"BOOTP reply of {len(body)} bytes"
    (op, htype, hlen, hops, xid, _secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, bfile,
     cookie) = struct.unpack_from(DHCP_FIXED, body)
    assert (htype, hlen, hops, cookie) == (1, 6, 0, MAGIC)
    assert sname == bytes(64) and bfile == bytes(128)
    options: dict[int, bytes] = {}
    order: list[int] = []
    i = 240
    while True:
        code = body[i]
        if code == 0:
            i += 1
            continue
        if code == 255:
            break
        length = body[i + 1]
        assert i + 2 + length <= len(body)
        options[code] = options.get(code, b"") + body[i + 2:i + 2 + length]
        order.append(code)
        i += 2 + length
    assert not any(body[i + 1:]), "only padding after the end option"
    return DhcpReply(udp, op, xid, flags, struct.pack("!I", ciaddr), struct.pack("!I", yiaddr),
                     struct.pack("!I", siaddr), struct.pack("!I", giaddr), chaddr, options, order)


def decode_dns_names(data: bytes) -> list[str]:
    """Decode an RFC 1035 name list with compression pointers (option 119 data)."""
    names = []
    pos = 0
    while pos < len(data):
        labels: list[str] = []
        cursor, jumps, end = pos, 0, None
        while True:
            length = data[cursor]
            if length & 0xC0 == 0xC0:
                pointer = ((length & 0x3F) << 8) | data[cursor + 1]
                assert pointer < cursor, "pointers go backwards"
                if end is None:
                    end = cursor + 2
                cursor, jumps = pointer, jumps + 1
                assert jumps < 64
                continue
            if length == 0:
                if end is None:
                    end = cursor + 1
                break
            labels.append(data[cursor + 1:cursor + 1 + length].decode("ascii"))
            cursor += 1 + length
        names.append(".".join(labels))
        pos = end
    return names


class ClientState(Enum):
    """States of the test DHCP client (RFC 2131 figure 5, trimmed)."""

    INIT = "init"
    SELECTING = "selecting"
    REQUESTING = "requesting"
    BOUND = "bound"
    RENEWING = "renewing"


@dataclass
class DhcpTestClient:
    """A small DHCP client state machine that talks to the endpoint frame by frame."""

    mac: bytes = GUEST_MAC
    xid: int = 0x5EED0001
    broadcast: bool = False
    state: ClientState = ClientState.INIT
    address: bytes | None = None
    server_id: bytes | None = None
    server_mac: bytes | None = None
    offer: DhcpReply | None = None
    ack: DhcpReply | None = None
    naks: int = 0
    log: list[str] = field(default_factory=list)

    def _frame(self, msg_type: int, extra: list[tuple[int, bytes]], *, ciaddr: bytes = bytes(4),
               ip_src: bytes = bytes(4), ip_dst: bytes = b"\xff" * 4,
               eth_dst: bytes = BROADCAST_MAC) -> bytes:
        """One client message as a complete frame."""
        options = dhcp_options((53, bytes((msg_type,))), *extra,
                               (55, bytes((1, 3, 6, 15, 26, 51, 54, 119, 121))))
        body = dhcp_message(xid=self.xid, flags=0x8000 if self.broadcast else 0, ciaddr=ciaddr,
                            chaddr=self.mac, options=options)
        return udp_frame(ip_src, ip_dst, 68, 67, body, eth_dst=eth_dst, eth_src=self.mac)

    def discover(self) -> bytes:
        """INIT -> SELECTING: broadcast a DISCOVER."""
        assert self.state is ClientState.INIT
        self.state = ClientState.SELECTING
        return self._frame(1, [(57, struct.pack("!H", 576))])

    def renew(self) -> bytes:
        """BOUND -> RENEWING: unicast a REQUEST from our address to the server."""
        assert self.state is ClientState.BOUND and self.address and self.server_id
        assert self.server_mac is not None
        self.state = ClientState.RENEWING
        self.xid += 1
        return self._frame(3, [], ciaddr=self.address, ip_src=self.address,
                           ip_dst=self.server_id, eth_dst=self.server_mac)

    def receive(self, frame: bytes) -> bytes | None:
        """Handle one server frame; return the next client frame, if any."""
        reply = decode_dhcp_reply(frame)
        assert reply.op == 2 and reply.xid == self.xid and reply.chaddr == self.mac + bytes(10)
        assert reply.udp.eth_dst == self.mac
        assert reply.option_order[0] == 53, "message type first"
        kind = reply.message_type
        self.log.append(f"{self.state.value}: {kind}")
        if kind == 6:  # NAK
            self.naks += 1
            self.state, self.address = ClientState.INIT, None
            return None
        if self.state is ClientState.SELECTING and kind == 2:  # OFFER
            self.offer = reply
            self.server_id = reply.options[54]
            self.server_mac = reply.udp.eth_src
            self.state = ClientState.REQUESTING
            return self._frame(3, [(50, reply.yiaddr), (54, self.server_id)])
        if self.state in (ClientState.REQUESTING, ClientState.RENEWING) and kind == 5:  # ACK
            self.ack = reply
            self.address = reply.yiaddr
            self.state = ClientState.BOUND
            return None
        raise AssertionError(f"unexpected message type {kind} in state {self.state}")
