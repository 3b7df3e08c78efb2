"""What the host kernel says about a connection's socket, and the window and MSS it implies: sans I/O.

Theory of operation (passt's tcp.c: ``tcp_update_seqack_wnd``,
``tcp_wnd_from_sndbuf``, ``tcp_get_sndbuf``, ``tcp_rtt_dst_check``,
``tcp_conn_tap_mss``).  The window we offer the guest is not a buffer of
ours (we have none): it says how much the host socket can take onward.
passt derives it from the kernel:

* for a host-local peer (``LOCAL``: the target is an address of this host)
  and for destinations seen with a very low RTT, the peer's own receive
  window, ``tcpi_snd_wnd`` of ``TCP_INFO``: when the peer stops reading, its
  window closes and so does the guest's;
* otherwise the smaller of that and the room left in the socket's send
  buffer (``SO_MEMINFO``'s send buffer and queued memory, ``SIOCOUTQ``'s
  queued bytes), the buffer counted at 100% up to 128 KiB falling to 75%
  at 4 MiB, the per-segment overhead of the queue taken into account, and a
  room below one MSS offered as zero while data was sent lately (silly
  window avoidance, RFC 813);
* a kernel whose ``TCP_INFO`` lacks ``tcpi_snd_wnd`` (before Linux 4.19)
  gets the scaled send buffer size alone;
* at most 16 MiB (scale 8), and at least :data:`WINDOW_DEFAULT` on a SYN.

The functions here take the bytes the kernel returned and do the
arithmetic; :mod:`~shardswitch.worker.tcp.window` makes the system calls,
and decides when (never once per data frame).

``struct tcp_info``: :data:`LAYOUT` spells it out field by field (Linux
6.11's, passt's ``struct tcp_info_linux``); :data:`TCP_INFO` is the
precompiled :class:`struct.Struct` of it.  Every field sits at a multiple
of its size, so the packed layout (``=``) is the C layout; checked at
import together with the offsets of the fields read
(:class:`TcpInfoOffset`).  An older kernel returns fewer bytes: a field
beyond what it returned is absent (:func:`covers`), never read as zero by
accident; a newer one returns more than we ask for, which is cut.

The MSS the guest announced in its SYN goes on the host socket
(``TCP_MAXSEG``) before ``connect()``, as passt does, so the host peer is
sent segments the guest could take on a real link: :func:`host_mss`.
"""

from __future__ import annotations

import struct
from enum import IntEnum

#: struct tcp_info (include/uapi/linux/tcp.h, Linux 6.11), native byte order: (field, struct format).
#: The flag byte holds snd_wscale:4, rcv_wscale:4; the one after it delivery_rate_app_limited:1,
#: fastopen_client_fail:2.
LAYOUT: tuple[tuple[str, str], ...] = (
    ("state", "B"), ("ca_state", "B"), ("retransmits", "B"), ("probes", "B"), ("backoff", "B"),
    ("options", "B"), ("wscale", "B"), ("app_limited", "B"),
    ("rto", "I"), ("ato", "I"), ("snd_mss", "I"), ("rcv_mss", "I"),
    ("unacked", "I"), ("sacked", "I"), ("lost", "I"), ("retrans", "I"), ("fackets", "I"),
    ("last_data_sent", "I"), ("last_ack_sent", "I"), ("last_data_recv", "I"), ("last_ack_recv", "I"),
    ("pmtu", "I"), ("rcv_ssthresh", "I"), ("rtt", "I"), ("rttvar", "I"), ("snd_ssthresh", "I"),
    ("snd_cwnd", "I"), ("advmss", "I"), ("reordering", "I"), ("rcv_rtt", "I"), ("rcv_space", "I"),
    ("total_retrans", "I"),
    ("pacing_rate", "Q"), ("max_pacing_rate", "Q"), ("bytes_acked", "Q"), ("bytes_received", "Q"),
    ("segs_out", "I"), ("segs_in", "I"), ("notsent_bytes", "I"), ("min_rtt", "I"),
    ("data_segs_in", "I"), ("data_segs_out", "I"),
    ("delivery_rate", "Q"), ("busy_time", "Q"), ("rwnd_limited", "Q"), ("sndbuf_limited", "Q"),
    ("delivered", "I"), ("delivered_ce", "I"), ("bytes_sent", "Q"), ("bytes_retrans", "Q"),
    ("dsack_dups", "I"), ("reord_seen", "I"), ("rcv_ooopack", "I"), ("snd_wnd", "I"), ("rcv_wnd", "I"),
    ("rehash", "I"), ("total_rto", "H"), ("total_rto_recoveries", "H"), ("total_rto_time", "I"),
)
#: The whole structure: what we ask TCP_INFO for (TCP_INFO.size bytes).
TCP_INFO = struct.Struct("=" + "".join(fmt for _, fmt in LAYOUT))
#: Offset and end of every field of LAYOUT.
OFFSETS: dict[str, int] = {}
ENDS: dict[str, int] = {}
_offset = 0
for _name, _fmt in LAYOUT:
    _size = struct.calcsize(_fmt)
    assert _offset % _size == 0, f"tcp_info.{_name} is not naturally aligned"
    OFFSETS[_name], ENDS[_name] = _offset, _offset + _size
    _offset += _size
assert _offset == TCP_INFO.size == 248 == struct.calcsize("@" + TCP_INFO.format[1:])
del _name, _fmt, _offset, _size
#: Bytes of the BSD part every kernel returns (struct tcp_info of netinet/tcp.h).
TCP_INFO_BASE = ENDS["total_retrans"]
assert TCP_INFO_BASE == 104


class TcpInfoOffset(IntEnum):
    """Offsets of the fields of struct tcp_info we read (checked against LAYOUT at import)."""

    STATE = 0
    LAST_DATA_SENT = 44
    RTT = 68
    MIN_RTT = 148
    SND_WND = 228


for _field in TcpInfoOffset:
    assert OFFSETS[_field.name.lower()] == _field, f"tcp_info.{_field.name.lower()} moved"
del _field


class MemInfo(IntEnum):
    """Indices of SO_MEMINFO's array of u32 (SK_MEMINFO_*) that we read."""

    SNDBUF = 3
    WMEM_QUEUED = 5


#: SO_MEMINFO (not in Python's socket module), and the bytes we ask it for (SK_MEMINFO_VARS u32s).
SO_MEMINFO = 55
MEMINFO_LEN = 9 * 4
_U32 = struct.Struct("=I")
_MEMINFO = struct.Struct("=6I")
assert _MEMINFO.size == (MemInfo.WMEM_QUEUED + 1) * 4

#: Initial window (RFC 6928), at least what a SYN offers; and passt's default MSS (RFC 9293).
WINDOW_DEFAULT = 14600
MSS_DEFAULT = 536
#: Largest window we offer: 16 MiB, a full 16 bits at our window scale 8.
MAX_WINDOW = 1 << (16 + 8)
#: The send buffer is counted whole up to SNDBUF_SMALL, falling linearly to SNDBUF_FACTOR % at SNDBUF_BIG.
SNDBUF_SMALL = 128 * 1024
SNDBUF_BIG = 4 * 1024 * 1024
SNDBUF_FACTOR = 75
#: passt keeps the send buffer size in 24 bits of 32: multiples of this.
SNDBUF_GRAIN = 256
#: A destination whose minimum RTT is at most this (microseconds) is as good as local; entries kept.
LOW_RTT_THRESHOLD = 10
LOW_RTT_TABLE_SIZE = 8
#: min_rtt of a socket without an RTT sample yet (the kernel's ~0U).
NO_RTT = 0xFFFFFFFF
#: Largest MSS of a guest's SYN taken for the host socket: IP's largest packet less headers, 4-byte aligned.
MSS4 = (0xFFFF - 20 - 20) & ~3
MSS6 = (0xFFFF - 20 - 40) & ~3
#: What the kernel takes for TCP_MAXSEG (TCP_MIN_MSS, MAX_TCP_WINDOW); other values fail with EINVAL.
TCP_MIN_MSS = 88
TCP_MAX_MAXSEG = 32767


def covers(length: int, field: str) -> bool:
    """Whether ``length`` bytes of TCP_INFO include ``field`` (a name of LAYOUT)."""
    return ENDS[field] <= length


def decode(data: bytes) -> dict[str, int]:
    """The fields of a TCP_INFO answer, by name; only those the kernel returned whole (a shorter, older
    struct has fewer; bytes beyond LAYOUT are ignored)."""
    length = min(len(data), TCP_INFO.size)
    values = TCP_INFO.unpack(bytes(data[:length]).ljust(TCP_INFO.size, b"\0"))
    return {name: value for (name, _), value in zip(LAYOUT, values) if ENDS[name] <= length}


def u32(data: bytes, offset: TcpInfoOffset) -> int:
    """One u32 field of TCP_INFO (the caller checked that ``data`` covers it)."""
    value: int = _U32.unpack_from(data, offset)[0]
    return value


def meminfo(data: bytes) -> tuple[int, int] | None:
    """(send buffer, queued write memory) of an SO_MEMINFO answer; None when it is too short."""
    if len(data) < _MEMINFO.size:
        return None
    values = _MEMINFO.unpack_from(data)
    return values[MemInfo.SNDBUF], values[MemInfo.WMEM_QUEUED]


def clamped_scale(x: int, y: int, lo: int, hi: int, f: int) -> int:
    """``x`` scaled from 100% (``y`` up to ``lo``) linearly down to ``f`` % (``y`` from ``hi`` on): passt's
    clamped_scale(), in integers as it does."""
    if y < lo:
        return x
    if y > hi:
        return x * f // 100
    return x - (x * (y - lo) // (hi - lo)) * (100 - f) // 100


def scaled_sndbuf(sndbuf: int) -> int:
    """The part of a send buffer of ``sndbuf`` bytes we count on (passt's SNDBUF_GET after tcp_get_sndbuf)."""
    scaled = min(clamped_scale(sndbuf, sndbuf, SNDBUF_SMALL, SNDBUF_BIG, SNDBUF_FACTOR), 0x7FFFFFFF)
    return scaled - scaled % SNDBUF_GRAIN


def sndbuf_room(sendq: int, mss: int, sndbuf: int, wmem_queued: int | None) -> int:
    """Bytes the send buffer can still take: ``sendq`` bytes queued (SIOCOUTQ), the buffer's size, its queued
    memory (SO_MEMINFO; None without it: the bytes queued against the scaled size, as passt falls back to).

    With the memory known and more of it queued than bytes, the overhead of a segment is estimated from the
    queue and the room counted in whole segments of ``mss``.
    """
    scaled = scaled_sndbuf(sndbuf)
    if wmem_queued is None:
        return max(scaled - sendq, 0)
    if wmem_queued > sndbuf:
        return 0
    if not sendq or not mss or wmem_queued <= sendq:
        # passt computes this in unsigned arithmetic; a queue between the scaled and the whole buffer
        # leaves no room rather than wrapping round.
        return max(scaled - wmem_queued, 0)
    used_segs = max(sendq // mss, 1)
    overhead = (wmem_queued - sendq) // used_segs
    return (sndbuf - wmem_queued) // (mss + overhead) * mss


def window_from_sndbuf(info: bytes, mss: int, sendq: int, sndbuf: int, wmem_queued: int | None) -> int:
    """passt's tcp_wnd_from_sndbuf(): the peer's window (``info``: TCP_INFO covering snd_wnd) and the room
    in the send buffer, the smaller; a room below one MSS is zero while data was sent within ten RTTs."""
    limit = sndbuf_room(sendq, mss, sndbuf, wmem_queued)
    if limit < mss and sendq:
        rtt_ms_ceiling = -(-u32(info, TcpInfoOffset.RTT) // 1000)
        if u32(info, TcpInfoOffset.LAST_DATA_SENT) < rtt_ms_ceiling * 10:
            limit = 0
    return min(u32(info, TcpInfoOffset.SND_WND), limit)


def fallback_window(sndbuf: int) -> int:
    """The window of a kernel without tcpi_snd_wnd: the scaled send buffer (SO_SNDBUF) alone."""
    return min(scaled_sndbuf(sndbuf), MAX_WINDOW)


def offered(window: int, established: bool) -> int:
    """The window to offer in bytes (before scaling): at most MAX_WINDOW; on our SYN or SYN-ACK (before
    the connection is established) at least WINDOW_DEFAULT."""
    window = min(window, MAX_WINDOW)
    return window if established else max(window, WINDOW_DEFAULT)


def low_rtt(info: bytes) -> bool:
    """Whether TCP_INFO (covering min_rtt) shows a minimum RTT low enough for a host-local destination
    (none measured yet is not low)."""
    rtt = u32(info, TcpInfoOffset.MIN_RTT)
    return rtt != NO_RTT and rtt <= LOW_RTT_THRESHOLD


class LowRttTable:
    """Addresses of ours the guest reached with a very low RTT: passt's low_rtt_dst, one per worker.

    Connections to them get the peer's window alone, as host-local ones.  A
    new address takes the first hole and clears the slot after it, so the
    table always keeps a hole and the oldest entries go first.
    """

    def __init__(self) -> None:
        """An empty table (b"": a hole)."""
        self.entries: list[bytes] = [b""] * LOW_RTT_TABLE_SIZE

    def __contains__(self, addr: bytes) -> bool:
        """Whether ``addr`` (packed, 4 or 16 bytes) was seen with a low RTT."""
        return addr in self.entries

    def add(self, addr: bytes) -> None:
        """Record ``addr`` (passt's tcp_rtt_dst_check once the RTT is known to be low)."""
        hole = -1
        for i, entry in enumerate(self.entries):
            if entry == addr:
                return
            if hole == -1 and not entry:
                hole = i
        if hole == -1:
            return
        self.entries[hole] = addr
        self.entries[(hole + 1) % LOW_RTT_TABLE_SIZE] = b""


def host_mss(syn_mss: int | None, v6: bool) -> int | None:
    """The TCP_MAXSEG for the host socket of a guest's connection whose SYN announced ``syn_mss`` (None: no
    option, RFC 9293's default); None when there is nothing to set.

    passt's tcp_conn_tap_mss(): at most the largest MSS of an IP packet.  The
    kernel refuses a value outside [TCP_MIN_MSS, 32767] (EINVAL, which passt
    ignores) and takes 0 as "no clamp": those are not set at all.
    """
    mss = MSS_DEFAULT if syn_mss is None else syn_mss
    mss = min(mss, MSS6 if v6 else MSS4)
    if not TCP_MIN_MSS <= mss <= TCP_MAX_MAXSEG:
        return None
    return mss
