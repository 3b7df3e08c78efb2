"""Sans-IO TCP: segment parsing and building, sequence arithmetic, the per-connection decisions."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardswitch.net import eth, ipv4, ipv6, tcp
from shardswitch.net.checksum import checksum
from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.tcp import Addressing, ConnFlag, TcpConn, TcpFlag, TcpSegment

GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
A4 = Addressing(False, OUR_MAC, GUEST_MAC, bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2]), 40000, 80)
A6 = Addressing(True, OUR_MAC, GUEST_MAC, ipv6.addr_from_str("fe80::1"), ipv6.addr_from_str("fe80::2"), 40000, 80)


def parsed(frame: bytes) -> TcpSegment:
    """The TCP segment of a built frame, through the validating parsers."""
    view = memoryview(frame)[14:]
    if frame[12:14] == b"\x86\xdd":
        return tcp.parse6(ipv6.parse(view))
    return tcp.parse4(ipv4.parse(view))


@pytest.mark.parametrize("addr", [A4, A6], ids=["ipv4", "ipv6"])
def test_build_parse_round_trip(addr: Addressing) -> None:
    """Every field survives build -> parse, checksums included, SYN options read back."""
    frame = tcp.build(addr, 0xFFFFFFF0, 77, int(TcpFlag.SYN | TcpFlag.ACK), 4096, tcp.syn_options(1460, 7),
                      b"payload")
    seg = parsed(frame)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack) == (40000, 80, 0xFFFFFFF0, 77)
    assert seg.flags == TcpFlag.SYN | TcpFlag.ACK and seg.window == 4096
    assert bytes(seg.payload) == b"payload" and (seg.mss, seg.wscale) == (1460, 7)


def test_syn_options_without_window_scale() -> None:
    """No scaling offered by the guest: only MSS (padded with NOPs) on our SYN-ACK."""
    seg = parsed(tcp.build(A4, 1, 2, int(TcpFlag.SYN), 100, tcp.syn_options(1000, None)))
    assert (seg.mss, seg.wscale) == (1000, None)


def test_bad_checksum_is_dropped() -> None:
    """One flipped payload bit: TCP_BAD_CHECKSUM."""
    frame = bytearray(tcp.build(A4, 1, 2, int(TcpFlag.ACK), 100, payload=b"abcd"))
    frame[-1] ^= 1
    with pytest.raises(PacketError) as err:
        parsed(bytes(frame))
    assert err.value.reason == DropReason.TCP_BAD_CHECKSUM


def ipv4_with_tcp(tcp_bytes: bytes) -> ipv4.Ipv4Packet:
    """An IPv4 packet around raw TCP bytes (checksum made valid when there is room for it)."""
    buf = bytearray(20 + len(tcp_bytes))
    buf[20:] = tcp_bytes
    ipv4.pack_header_into(buf, 0, 1, 2, 6, len(tcp_bytes))
    if len(tcp_bytes) >= 18:
        start = 1 + 2 + 6 + len(tcp_bytes)
        struct.pack_into("!H", buf, 36, 0)
        struct.pack_into("!H", buf, 36, checksum(bytes(buf[20:]), start))
    return ipv4.parse(memoryview(bytes(buf)))


@pytest.mark.parametrize("raw", [
    b"\x00" * 10,                                                    # shorter than a header
    struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0x40, 0x10, 0, 0, 0),      # data offset 16 < 20
    struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0xF0, 0x10, 0, 0, 0),      # data offset 60 > length
    struct.pack("!HHIIBBHHH", 0, 2, 0, 0, 0x50, 0x10, 0, 0, 0),      # port 0
], ids=["short", "offset-small", "offset-large", "port0"])
def test_malformed_is_dropped(raw: bytes) -> None:
    """Bad lengths and port 0: TCP_MALFORMED."""
    with pytest.raises(PacketError) as err:
        tcp.parse4(ipv4_with_tcp(raw))
    assert err.value.reason == DropReason.TCP_MALFORMED


def test_options_walk_stops_at_garbage() -> None:
    """Truncated or zero-length options end the walk without an error; SACK-permitted is ignored."""
    assert tcp.parse_options(memoryview(bytes([4, 2, 1, 3, 3, 20]))) == (None, 14)
    assert tcp.parse_options(memoryview(bytes([2, 0, 3, 3, 5]))) == (None, None)
    assert tcp.parse_options(memoryview(bytes([2, 4, 5]))) == (None, None)
    assert tcp.parse_options(memoryview(bytes([0, 2, 4, 5, 180]))) == (None, None)


def test_sequence_arithmetic_wraps() -> None:
    """Comparisons and distances modulo 2**32."""
    assert tcp.seq_lt(0xFFFFFFFF, 0) and not tcp.seq_lt(0, 0xFFFFFFFF)
    assert tcp.seq_le(5, 5) and not tcp.seq_lt(5, 5)
    assert tcp.seq_diff(3, 0xFFFFFFFE) == 5 and tcp.seq_add(0xFFFFFFFF, 2) == 1


def syn(mss: int | None = 1400, wscale: int | None = 7, seq: int = 100, window: int = 64000) -> TcpSegment:
    """A guest SYN."""
    return TcpSegment(40000, 80, seq, 0, int(TcpFlag.SYN), window, memoryview(b""), mss, wscale)


def established(isn: int = 5000) -> TcpConn:
    """A connection whose SYN-ACK the guest ACKed (window 1000 << 7)."""
    conn = TcpConn.from_syn(syn(), isn, 65480)
    conn.flags = ConnFlag.SYN_SENT
    assert conn.on_ack(isn + 1, 1000) == 0
    return conn


def test_from_syn_negotiates_mss_and_scaling() -> None:
    """MSS is the smaller one; our window scale only when the guest offered one."""
    conn = TcpConn.from_syn(syn(), 5000, 65480)
    assert (conn.mss, conn.ws_from_guest, conn.ws_to_guest) == (1400, 7, tcp.OUR_WS)
    assert (conn.seq_from_guest, conn.seq_to_guest, conn.seq_ack_from_guest) == (101, 5001, 5000)
    plain = TcpConn.from_syn(syn(mss=None, wscale=None), 0, 65480)
    assert (plain.mss, plain.ws_from_guest, plain.ws_to_guest) == (tcp.DEFAULT_MSS, 0, 0)


def test_acks_release_data_and_fin() -> None:
    """ACKs release sent data bytes; the ACK of our FIN releases none and marks it."""
    conn = established()
    assert conn.flags & ConnFlag.ESTABLISHED and conn.wnd_from_guest == 128000
    conn.seq_to_guest = tcp.seq_add(conn.seq_to_guest, 3000)
    assert conn.in_flight() == 3000 and conn.sendable() == 125000
    assert conn.on_ack(5001 + 1000, 1000) == 1000
    assert conn.on_ack(5001 + 500, 1000) == 0         # old ACK: nothing
    assert conn.on_ack(5001 + 9000, 1000) == 0        # beyond what we sent: nothing
    conn.flags |= ConnFlag.FIN_SENT
    conn.seq_to_guest = tcp.seq_add(conn.seq_to_guest, 1)
    assert conn.in_flight() == 2000
    assert conn.on_ack(conn.seq_to_guest, 1000) == 2000 and conn.flags & ConnFlag.FIN_ACKED


def test_three_duplicate_acks_rewind() -> None:
    """Fast retransmit: three pure duplicates rewind; ACKs carrying data never count."""
    conn = established()
    conn.seq_to_guest = tcp.seq_add(conn.seq_to_guest, 3000)
    for _ in range(5):
        conn.on_ack(5001, 1000, pure=False)
    assert conn.seq_to_guest == 5001 + 3000
    conn.on_ack(5001, 1000)
    conn.on_ack(5001, 1000)
    assert conn.seq_to_guest == 5001 + 3000
    conn.on_ack(5001, 1000)
    assert conn.seq_to_guest == 5001


def test_rewind_clears_an_unacked_fin() -> None:
    """A FIN not ACKed yet is sent again after a rewind."""
    conn = established()
    conn.flags |= ConnFlag.FIN_SENT
    conn.seq_to_guest = tcp.seq_add(conn.seq_to_guest, 11)
    conn.rewind()
    assert conn.seq_to_guest == 5001 and not conn.flags & ConnFlag.FIN_SENT


def test_new_data_skips_old_bytes_and_refuses_gaps() -> None:
    """In order: skip 0; overlapping retransmission: skip the old part; ahead: None."""
    conn = established()
    assert conn.new_data(101, 10) == 0
    conn.seq_from_guest = 111
    assert conn.new_data(101, 20) == 10 and conn.new_data(101, 5) == 5
    assert conn.new_data(120, 5) is None


def test_window_field_scales_and_saturates() -> None:
    """The advertised window in units of our scale, at most 0xFFFF units."""
    conn = established()
    assert conn.window_field(1 << 20) == (1 << 20) >> tcp.OUR_WS and conn.wnd_to_guest == 1 << 20
    assert conn.window_field(1 << 40) == 0xFFFF


def test_done_needs_both_fins() -> None:
    """Closed when our FIN is ACKed and the guest's taken."""
    conn = established()
    conn.flags |= ConnFlag.FIN_ACKED
    assert not conn.done()
    conn.flags |= ConnFlag.GUEST_FIN_RCVD
    assert conn.done()


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(v6=st.booleans(), addrs=st.binary(min_size=32, max_size=32), macs=st.binary(min_size=12, max_size=12),
       ports=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)), base=st.integers(0, 16),
       seq=st.integers(0, 2 ** 32 - 1), flags=st.integers(0, 0xFF), data=st.data())
def test_headers_from_the_template_equal_headers_packed_field_by_field(
        v6: bool, addrs: bytes, macs: bytes, ports: tuple[int, int], base: int, seq: int, flags: int,
        data: st.DataObject) -> None:
    """The per-connection template, its length and adjusted IPv4 checksum give the headers that packing every
    field (and summing the IPv4 header) gives, whatever the addresses and the segment length."""
    size = 16 if v6 else 4
    a = Addressing(v6, macs[:6], macs[6:], addrs[:size], addrs[16:16 + size], *ports)
    tcp_len = data.draw(st.integers(tcp.TCP_HLEN, 0xFFFF if v6 else 0xFFFF - ipv4.IPV4_HLEN))
    fast, slow = bytearray(base + 80), bytearray(base + 80)
    tcp.pack_headers_into(fast, base, a, tcp_len, seq, 7, flags, 1000)
    ip_off = base + eth.ETH_HLEN
    if v6:
        eth.pack_header_into(slow, base, a.eth_dst, a.eth_src, eth.EtherType.IPV6)
        ipv6.pack_header_into(slow, ip_off, a.src, a.dst, 6, tcp_len)
        tcp_off = ip_off + ipv6.IPV6_HLEN
    else:
        eth.pack_header_into(slow, base, a.eth_dst, a.eth_src, eth.EtherType.IPV4)
        ipv4.pack_header_into(slow, ip_off, int.from_bytes(a.src, "big"), int.from_bytes(a.dst, "big"), 6, tcp_len,
                              flags=ipv4.FragmentFlags.DF)
        tcp_off = ip_off + ipv4.IPV4_HLEN
    tcp.HEADER.pack_into(slow, tcp_off, a.src_port, a.dst_port, seq, 7, 5 << 4, flags, 1000, 0, 0)
    assert fast == slow
