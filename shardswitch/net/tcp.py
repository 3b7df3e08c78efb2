"""TCP segments and the per-connection sequence state, without a TCP stack.

Theory of operation (passt's model, see docs/passt-model.md).
We never run a TCP state machine with buffers of our own: a connection from
the guest is spliced onto a host kernel socket, and all reliability towards
the host is the kernel's.  Towards the guest we keep only sequence numbers:

* guest -> host: a segment's payload is ``send()``-ed to the socket and the
  guest is ACKed only for what the socket took (``seq_from_guest``); the
  guest retransmits the rest.  Out-of-order data is not kept: a gap is
  answered by a duplicate ACK.
* host -> guest: data stays in the socket's receive queue until the guest
  ACKs it.  It is peeked at offset ``seq_to_guest - seq_ack_from_guest``
  straight into frames, within the guest's (scaled) window and MSS; a guest
  ACK lets the socket side discard that many bytes.  Retransmission is a
  rewind of ``seq_to_guest`` to ``seq_ack_from_guest``.

:class:`TcpConn` holds these numbers and the small set of events of a
connection (:class:`ConnFlag`) and makes the decisions as pure methods over
integers (how much a guest ACK releases, how much may be sent, whether a
segment's payload is new); the socket side (:mod:`shardswitch.worker.tcp`)
does the I/O.  :func:`parse` validates a guest segment (lengths, data
offset, checksum over the IPv4 or IPv6 pseudo-header, options MSS and
window scale; SACK-permitted and the others are ignored) and
:func:`pack_into` writes Ethernet/IP/TCP headers in front of a payload that
is already in place, so host data is copied exactly once, from the socket
into the frame.

Checksum offload: ``verify=False`` tells :func:`parse4` / :func:`parse6` that
the guest left the checksum to the device (its virtio-net header had
NEEDS_CSUM: the field holds only the pseudo-header sum), so it is not
checked; ``csum=False`` tells :func:`pack_into` to leave the TCP checksum 0
for a guest that takes our frames as verified (DATA_VALID).  Summing a 64 KiB
segment is most of the cost of a bulk transfer, so both matter.  Sequence numbers are compared modulo 2**32
(:func:`seq_lt` and friends).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import cast

from . import checksum, eth, inany, ipv4, ipv6
from .drop import DropReason, PacketError
from .inany import InAny
from .ipv4 import IpProto, Ipv4Packet
from .ipv6 import Ipv6Packet

#: Source port, destination port, sequence, acknowledgement, data offset, flags, window,
#: checksum, urgent pointer.
HEADER = struct.Struct("!HHIIBBHHH")
#: Length of a header without options.
TCP_HLEN = HEADER.size
assert TCP_HLEN == 20
_U16 = struct.Struct("!H")
_IPV4_LENGTH = _U16
#: Offsets of the length fields in the IPv4 header (total length) and the IPv6 header (payload length).
_IPV4_LENGTH_OFFSET = 2
_IPV6_LENGTH_OFFSET = 4
#: Options we put on a SYN-ACK: MSS, NOP, window scale (4 + 1 + 3 bytes).
_SYN_OPTIONS = struct.Struct("!BBHBBBB")
SYN_OPTIONS_LEN = _SYN_OPTIONS.size
#: Offset of the checksum in the TCP header.
CHECKSUM_OFFSET = 16
#: Header bytes before a TCP payload, per IP version (no options).
HEADERS4 = eth.ETH_HLEN + ipv4.IPV4_HLEN + TCP_HLEN
HEADERS6 = eth.ETH_HLEN + ipv6.IPV6_HLEN + TCP_HLEN
#: Largest window scale (RFC 7323) and the one we offer.
WS_MAX = 14
OUR_WS = 8
#: MSS assumed when the guest's SYN carries none (RFC 9293).
DEFAULT_MSS = 536
_MOD = 1 << 32
_MASK = _MOD - 1


class TcpFlag(IntFlag):
    """Flag bits of the TCP header."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


class TcpOption(IntEnum):
    """TCP option kinds we read or write."""

    EOL = 0
    NOP = 1
    MSS = 2
    WINDOW_SCALE = 3
    SACK_PERMITTED = 4


class ConnFlag(IntFlag):
    """Events of one connection (passt's ``events``)."""

    NONE = 0
    #: Our non-blocking connect() is in progress.
    CONNECTING = 0x01
    #: The SYN-ACK went to the guest.
    SYN_SENT = 0x02
    #: The guest ACKed our SYN.
    ESTABLISHED = 0x04
    #: The host socket hit end of stream (after everything was peeked).
    SOCK_FIN_RCVD = 0x08
    #: Our FIN went to the guest (cleared on a rewind until the guest ACKs it).
    FIN_SENT = 0x10
    #: The guest ACKed our FIN.
    FIN_ACKED = 0x20
    #: The guest's FIN was taken: the socket is shut down for writing.
    GUEST_FIN_RCVD = 0x40


#: The flags as plain ints for the per-segment path: ``int & IntFlag`` goes through the enum's
#: ``__rand__`` and builds a member (about a microsecond each), ``int & int`` is one operation.
#: :attr:`TcpSegment.flags` and :attr:`TcpConn.flags` are plain ints holding these bits.
FIN, SYN, RST, PSH, ACK = (int(TcpFlag.FIN), int(TcpFlag.SYN), int(TcpFlag.RST), int(TcpFlag.PSH),
                           int(TcpFlag.ACK))
CONNECTING, SYN_SENT, ESTABLISHED = int(ConnFlag.CONNECTING), int(ConnFlag.SYN_SENT), int(ConnFlag.ESTABLISHED)
SOCK_FIN_RCVD, FIN_SENT, FIN_ACKED = int(ConnFlag.SOCK_FIN_RCVD), int(ConnFlag.FIN_SENT), int(ConnFlag.FIN_ACKED)
GUEST_FIN_RCVD = int(ConnFlag.GUEST_FIN_RCVD)


def seq_lt(a: int, b: int) -> bool:
    """``a`` before ``b`` modulo 2**32."""
    return 0 < ((b - a) & _MASK) < 0x80000000


def seq_le(a: int, b: int) -> bool:
    """``a`` before or equal to ``b`` modulo 2**32."""
    return ((b - a) & _MASK) < 0x80000000


def seq_diff(a: int, b: int) -> int:
    """``a - b`` modulo 2**32 (the distance from ``b`` forward to ``a``)."""
    return (a - b) & _MASK


def seq_add(a: int, n: int) -> int:
    """``a + n`` modulo 2**32."""
    return (a + n) & _MASK


@dataclass(slots=True)
class TcpSegment:
    """A validated TCP segment from the guest; ``payload`` points into the frame."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: memoryview
    #: Options (only meaningful on a SYN): None when absent.
    mss: int | None = None
    wscale: int | None = None


def parse_options(options: memoryview) -> tuple[int | None, int | None]:
    """MSS and window scale from an options area; malformed options end the walk."""
    mss: int | None = None
    wscale: int | None = None
    i = 0
    end = len(options)
    while i < end:
        kind = options[i]
        if kind == TcpOption.EOL:
            break
        if kind == TcpOption.NOP:
            i += 1
            continue
        if i + 1 >= end:
            break
        length = options[i + 1]
        if length < 2 or i + length > end:
            break
        if kind == TcpOption.MSS and length == 4:
            mss = _U16.unpack_from(options, i + 2)[0]
        elif kind == TcpOption.WINDOW_SCALE and length == 3:
            wscale = min(options[i + 2], WS_MAX)
        i += length
    return mss, wscale


def _parse(data: memoryview, start: int, verify: bool) -> TcpSegment:
    """Decode ``data`` (the whole TCP segment); ``start``: the pseudo-header sum; checksum checked if ``verify``."""
    available = len(data)
    if available < TCP_HLEN:
        raise PacketError(DropReason.TCP_MALFORMED, f"{available} bytes, shorter than a header")
    sport, dport, seq, ack, offset, flags, window, _csum, _urg = HEADER.unpack_from(data)
    hlen = (offset >> 4) * 4
    if hlen < TCP_HLEN or hlen > available:
        raise PacketError(DropReason.TCP_MALFORMED, f"data offset {hlen} in {available} bytes")
    if verify and not checksum.is_valid(data, start):
        raise PacketError(DropReason.TCP_BAD_CHECKSUM)
    if not sport or not dport:
        raise PacketError(DropReason.TCP_MALFORMED, "port 0")
    mss = wscale = None
    if flags & SYN and hlen > TCP_HLEN:
        mss, wscale = parse_options(data[TCP_HLEN:hlen])
    return TcpSegment(sport, dport, seq, ack, flags, window, data[hlen:], mss, wscale)


def parse4(packet: Ipv4Packet, verify: bool = True) -> TcpSegment:
    """Validate the TCP segment of an IPv4 packet (TCP_MALFORMED, TCP_BAD_CHECKSUM).

    ``verify=False``: the checksum is partial (NEEDS_CSUM) and not checked.
    """
    data = packet.payload
    if not verify:
        return _parse(data, 0, False)
    return _parse(data, checksum.pseudo_header_v4(packet.src, packet.dst, IpProto.TCP, len(data)), True)


def parse6(packet: Ipv6Packet, verify: bool = True) -> TcpSegment:
    """Validate the TCP segment of an IPv6 packet (TCP_MALFORMED, TCP_BAD_CHECKSUM).

    ``verify=False``: the checksum is partial (NEEDS_CSUM) and not checked.
    """
    data = packet.payload
    if not verify:
        return _parse(data, 0, False)
    return _parse(data, ipv6.pseudo_header(packet.src, packet.dst, IpProto.TCP, len(data)), True)


@dataclass(slots=True)
class Addressing:
    """The fixed part of every frame of one connection to the guest.

    ``template`` holds the Ethernet and IP headers as they are for every frame
    of the connection, with the IP length field 0 (and, for IPv4, the header
    checksum field 0): a frame's headers are that copy, its length, and for
    IPv4 the checksum of the template's sum (``ip_sum``) plus the length,
    instead of being packed and summed field by field per frame.  Built at the
    first frame; the fields are not changed afterwards.
    """

    v6: bool
    eth_dst: bytes
    eth_src: bytes
    #: Our address (what the guest connected to) and the guest's, 4 or 16 bytes.
    src: bytes
    dst: bytes
    src_port: int
    dst_port: int
    template: bytes = field(default=b"", init=False, repr=False, compare=False)
    #: IPv4: one's complement sum of the template's IP header (checksum field 0).
    ip_sum: int = field(default=0, init=False, repr=False, compare=False)

    def make_template(self) -> bytes:
        """Build (once, at the first frame) and return the header template."""
        buf = bytearray(eth.ETH_HLEN + (ipv6.IPV6_HLEN if self.v6 else ipv4.IPV4_HLEN))
        if self.v6:
            eth.pack_header_into(buf, 0, self.eth_dst, self.eth_src, eth.EtherType.IPV6)
            ipv6.pack_header_into(buf, eth.ETH_HLEN, self.src, self.dst, IpProto.TCP, 0)
        else:
            eth.pack_header_into(buf, 0, self.eth_dst, self.eth_src, eth.EtherType.IPV4)
            ipv4.pack_header_into(buf, eth.ETH_HLEN, int.from_bytes(self.src, "big"), int.from_bytes(self.dst, "big"),
                                  IpProto.TCP, 0, flags=ipv4.FragmentFlags.DF)
            _U16.pack_into(buf, eth.ETH_HLEN + ipv4.CHECKSUM_OFFSET, 0)
            _IPV4_LENGTH.pack_into(buf, eth.ETH_HLEN + _IPV4_LENGTH_OFFSET, 0)
            self.ip_sum = checksum.ones_sum(memoryview(buf)[eth.ETH_HLEN:])
        self.template = bytes(buf)
        return self.template

    @classmethod
    def between(cls, eth_dst: bytes, eth_src: bytes, src: InAny, dst: InAny, src_port: int,
                dst_port: int) -> Addressing:
        """The addressing of frames ``src``:``src_port`` -> ``dst``:``dst_port`` given as 16-byte addresses."""
        return cls(not inany.is_v4(src), eth_dst, eth_src, inany.packed(src), inany.packed(dst), src_port, dst_port)

    @property
    def headers_len(self) -> int:
        """Bytes of headers before the payload (without TCP options)."""
        return HEADERS6 if self.v6 else HEADERS4


def pack_into(buf: bytearray, a: Addressing, seq: int, ack: int, flags: int, window: int,
              options: bytes = b"", csum: bool = True) -> None:
    """Write the headers of a frame whose TCP payload already sits at its end of ``buf``.

    ``buf`` holds ``headers_len + len(options)`` header bytes then the payload;
    the IP checksum is computed here, and the TCP checksum unless ``csum`` is
    False (a guest that accepts DATA_VALID: the field stays 0).
    """
    tcp_off = eth.ETH_HLEN + (ipv6.IPV6_HLEN if a.v6 else ipv4.IPV4_HLEN)
    tcp_len = len(buf) - tcp_off
    pack_headers_into(buf, 0, a, tcp_len, seq, ack, flags, window, options)
    if csum:
        if a.v6:
            start = ipv6.pseudo_header(a.src, a.dst, IpProto.TCP, tcp_len)
        else:
            start = checksum.pseudo_header_v4(int.from_bytes(a.src, "big"), int.from_bytes(a.dst, "big"),
                                              IpProto.TCP, tcp_len)
        _U16.pack_into(buf, tcp_off + CHECKSUM_OFFSET, checksum.checksum(memoryview(buf)[tcp_off:], start))


def pack_headers_into(buf: bytearray | memoryview, base: int, a: Addressing, tcp_len: int, seq: int, ack: int,
                      flags: int, window: int, options: bytes = b"") -> None:
    """Write Ethernet, IP and TCP headers at ``buf[base:]`` for a TCP segment of ``tcp_len`` bytes
    (header and options included), the TCP checksum field 0.

    The payload may be anywhere (in place in guest buffers, for a guest that
    takes DATA_VALID); :func:`pack_into` sums it when the guest needs the checksum.
    """
    template = a.template or a.make_template()
    tcp_off = base + len(template)
    buf[base:tcp_off] = template
    ip_off = base + eth.ETH_HLEN
    if a.v6:
        if tcp_len > ipv6.MAX_PAYLOAD:
            raise ValueError(f"IPv6 payload of {tcp_len} bytes is too long")
        _U16.pack_into(buf, ip_off + _IPV6_LENGTH_OFFSET, tcp_len)
    else:
        total = ipv4.IPV4_HLEN + tcp_len
        if total > 0xFFFF:
            raise ValueError(f"IPv4 payload of {tcp_len} bytes is too long")
        folded = a.ip_sum + total
        folded = (folded & 0xFFFF) + (folded >> 16)
        _IPV4_LENGTH.pack_into(buf, ip_off + _IPV4_LENGTH_OFFSET, total)
        _U16.pack_into(buf, ip_off + ipv4.CHECKSUM_OFFSET, 0xFFFF - folded)
    hlen = TCP_HLEN + len(options)
    HEADER.pack_into(buf, tcp_off, a.src_port, a.dst_port, seq, ack, (hlen // 4) << 4, flags,
                     min(window, 0xFFFF), 0, 0)
    if options:
        buf[tcp_off + TCP_HLEN:tcp_off + hlen] = options


def as_frame(buf: bytearray) -> bytes:
    """A finished frame buffer, typed as the RX path's ``bytes`` without a copy.

    The RX writer only takes ``len()`` and slices of a frame, which a
    ``bytearray`` supports; copying 64 KiB frames to ``bytes`` would cost a
    copy per segment for the type checker's sake.  The buffer must not be
    modified once queued.
    """
    return cast(bytes, buf)


def build(a: Addressing, seq: int, ack: int, flags: int, window: int, options: bytes = b"",
          payload: bytes = b"") -> bytes:
    """A complete frame to the guest (control segments and small payloads)."""
    hl = a.headers_len + len(options)
    buf = bytearray(hl + len(payload))
    buf[hl:] = payload
    pack_into(buf, a, seq, ack, flags, window, options)
    return as_frame(buf)


def syn_options(mss: int, wscale: int | None) -> bytes:
    """MSS and (when the guest offered scaling) window scale options for our SYN-ACK."""
    if wscale is None:
        return _SYN_OPTIONS.pack(TcpOption.MSS, 4, mss, TcpOption.NOP, TcpOption.NOP, TcpOption.NOP,
                                 TcpOption.NOP)
    return _SYN_OPTIONS.pack(TcpOption.MSS, 4, mss, TcpOption.NOP, TcpOption.WINDOW_SCALE, 3, wscale)


def mss_for(mtu: int, v6: bool) -> int:
    """Our MSS for a link MTU."""
    return min(mtu - (ipv6.IPV6_HLEN if v6 else ipv4.IPV4_HLEN) - TCP_HLEN, 0xFFFF)


def max_payload(v6: bool) -> int:
    """The largest TCP payload one IP packet can carry (a TSO frame to the guest), without options."""
    return 0xFFFF - TCP_HLEN - (0 if v6 else ipv4.IPV4_HLEN)


@dataclass(slots=True)
class TcpConn:
    """Sequence state of one spliced connection, and the decisions made on it."""

    #: Next sequence number we send to the guest, and the first the guest has not ACKed.
    seq_to_guest: int
    seq_ack_from_guest: int
    #: Next sequence number expected from the guest (what we ACK), and the last ACK sent.
    seq_from_guest: int
    seq_ack_to_guest: int
    #: The guest's MSS and window scale (0 when not negotiated); ours.
    mss: int
    ws_from_guest: int
    ws_to_guest: int
    #: The guest's window in bytes (already scaled).
    wnd_from_guest: int = 0
    #: The window we last advertised, in bytes.
    wnd_to_guest: int = 0
    flags: int = 0
    #: Duplicate ACKs in a row (fast retransmit at 3).
    dup_acks: int = 0

    @classmethod
    def from_syn(cls, syn: TcpSegment, isn: int, our_mss: int) -> TcpConn:
        """State for a guest SYN; our SYN (``isn``) takes one sequence number."""
        ws_guest = syn.wscale if syn.wscale is not None else 0
        ws_ours = OUR_WS if syn.wscale is not None else 0
        mss = min(syn.mss if syn.mss else DEFAULT_MSS, our_mss)
        nxt = seq_add(syn.seq, 1)
        return cls(seq_add(isn, 1), isn, nxt, nxt, max(mss, 64), ws_guest, ws_ours,
                   wnd_from_guest=syn.window, flags=CONNECTING)

    @classmethod
    def for_host_client(cls, isn: int, our_mss: int) -> TcpConn:
        """State for a connection a host client opened (port forwarding): our SYN (``isn``) goes first."""
        return cls(seq_add(isn, 1), isn, 0, 0, our_mss, 0, OUR_WS, flags=SYN_SENT)

    def on_syn_ack(self, seg: TcpSegment) -> bool:
        """The guest's SYN-ACK to our SYN: take its sequence, MSS and scaling; False if it ACKs something else.

        Window scaling holds only when both SYNs carried the option (RFC 7323).
        """
        if seg.ack != self.seq_to_guest:
            return False
        self.seq_from_guest = self.seq_ack_to_guest = seq_add(seg.seq, 1)
        self.mss = max(min(seg.mss if seg.mss else DEFAULT_MSS, self.mss), 64)
        if seg.wscale is None:
            self.ws_from_guest = self.ws_to_guest = 0
        else:
            self.ws_from_guest = seg.wscale
        # The window of a SYN is never scaled.
        self.wnd_from_guest = seg.window
        self.on_ack(seg.ack, 0)
        self.wnd_from_guest = seg.window
        return True

    def in_flight(self) -> int:
        """Data bytes sent to the guest and not ACKed yet (the socket's peek offset)."""
        sent = seq_diff(self.seq_to_guest, self.seq_ack_from_guest)
        if self.flags & FIN_SENT and not self.flags & FIN_ACKED:
            sent -= 1
        return max(sent, 0)

    def sendable(self) -> int:
        """Data bytes the guest's window allows now."""
        return max(self.wnd_from_guest - seq_diff(self.seq_to_guest, self.seq_ack_from_guest), 0)

    def on_ack(self, ack: int, window: int, pure: bool = True) -> int:
        """A guest ACK: update the window; returns how many data bytes it releases (to discard).

        ACKs outside ``[seq_ack_from_guest, seq_to_guest]`` only update the window.
        Three duplicates in a row (``pure``: no data, no FIN, same window) with data
        in flight rewind ``seq_to_guest`` (fast retransmit).
        """
        wnd = window << self.ws_from_guest
        same_window = wnd == self.wnd_from_guest
        self.wnd_from_guest = wnd
        old = self.seq_ack_from_guest
        if not seq_lt(old, ack) or not seq_le(ack, self.seq_to_guest):
            if pure and same_window and ack == old and self.seq_to_guest != old:
                self.dup_acks += 1
                if self.dup_acks >= 3:
                    self.dup_acks = 0
                    self.rewind()
            return 0
        self.dup_acks = 0
        released = seq_diff(ack, old)
        if not self.flags & ESTABLISHED:
            # The first ACK covers our SYN, which is no data.
            self.flags |= ESTABLISHED
            released -= 1
        if self.flags & FIN_SENT and ack == self.seq_to_guest:
            self.flags |= FIN_ACKED
            released -= 1
        self.seq_ack_from_guest = ack
        return max(released, 0)

    def rewind(self) -> None:
        """Retransmit: everything not ACKed is sent again (the peek offset goes back to 0)."""
        if not self.flags & ESTABLISHED:
            return
        self.seq_to_guest = self.seq_ack_from_guest
        if not self.flags & FIN_ACKED:
            self.flags &= ~FIN_SENT

    def new_data(self, seq: int, length: int) -> int | None:
        """Where a guest payload's new bytes start (bytes to skip); None when it leaves a gap."""
        skip = seq_diff(self.seq_from_guest, seq)
        if skip >= 0x80000000:
            return None
        return min(skip, length)

    def window_field(self, space: int) -> int:
        """The window field for ``space`` bytes of socket send buffer; records the window offered."""
        field = min(space >> self.ws_to_guest, 0xFFFF)
        self.wnd_to_guest = field << self.ws_to_guest
        return field

    def done(self) -> bool:
        """Both directions closed: our FIN ACKed and the guest's FIN taken."""
        return bool(self.flags & FIN_ACKED and self.flags & GUEST_FIN_RCVD)
