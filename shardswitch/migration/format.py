"""The device-state document of a live migration: versioned, validated, sans-IO.

Layout (what goes through QEMU's pipe)::

    offset  size  field
         0     8  magic b"SHRDSWST"
         8     4  version of the body (big-endian u32), :data:`VERSION`
        12     4  oldest version able to read it (big-endian u32)
        16     -  msgpack body: :class:`DeviceState`

A reader takes the newest version it knows between the two (only version 1
exists).  The body's structs are decoded with their types and constraints
(:mod:`msgspec`: every integer has its range, every address its length, every
queue its maximum size), then :func:`decode` checks what types cannot say
(queue lengths against each other, the interface kind of each side).  Any
failure is a :class:`StateError` naming what is wrong; nothing partial is
ever returned, so a target applies a state whole or not at all.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Annotated

import msgspec

from shardswitch.shm.layout import Pif

#: The header: magic, version, compat version.
HEADER = struct.Struct("!8sII")
assert HEADER.size == 16
MAGIC = b"SHRDSWST"
VERSION = 1
COMPAT_VERSION = 1
#: Largest document accepted whatever the flow table (a target accepts less: :mod:`.admit`).
MAX_STATE = 256 << 20
#: Largest send or receive queue of one connection that moves (larger ones are reset).
MAX_QUEUE = 32 << 20
#: Most flows of one queue pair in a document.
MAX_FLOWS = 1 << 20
#: Most queue pairs.
MAX_PAIRS = 256

U8 = Annotated[int, msgspec.Meta(ge=0, le=0xFF)]
U16 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
Addr16 = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
Mac = Annotated[bytes, msgspec.Meta(min_length=6, max_length=6)]
Queue = Annotated[bytes, msgspec.Meta(max_length=MAX_QUEUE)]
#: Window scale shift (RFC 7323: at most 14).
Scale = Annotated[int, msgspec.Meta(ge=0, le=14)]


class StateError(Exception):
    """A device state that cannot be read: truncated, foreign, of an unknown version, or inconsistent."""


class Side(msgspec.Struct, frozen=True, array_like=True):
    """One side of a flow as in the flow table (:class:`~shardswitch.shm.layout.FlowSide`)."""

    pif: U8
    ep_addr: Addr16
    ep_port: U16
    our_addr: Addr16
    our_port: U16


class TcpSocketState(msgspec.Struct, frozen=True, kw_only=True):
    """A host TCP socket dumped in repair mode (passt's ``tcp_tap_transfer_ext``).

    Sequence numbers are those of the first byte of each queue.  ``send_queue``
    holds what the guest sent that the peer has not ACKed, the last
    ``not_sent`` bytes of it not even sent; ``recv_queue`` what the peer sent
    that the guest has not ACKed.  Our FIN, when sent (``tcpi_state``
    FIN_WAIT1 or FIN_WAIT2), is in none of them.
    """

    #: TCP_INFO's tcpi_state and tcpi_options (TCPI_OPT_*), and the window scales.
    tcpi_state: U8
    tcpi_options: U8
    snd_ws: Scale
    rcv_ws: Scale
    #: MSS clamp (TCP_MAXSEG) and RFC 7323 timestamp (TCP_TIMESTAMP).
    mss: U32
    timestamp: U32
    seq_snd: U32
    seq_rcv: U32
    #: TCP_REPAIR_WINDOW.
    snd_wl1: U32
    snd_wnd: U32
    max_window: U32
    rcv_wnd: U32
    rcv_wup: U32
    send_queue: Queue = b""
    not_sent: U32 = 0
    recv_queue: Queue = b""


class TcpState(msgspec.Struct, frozen=True, kw_only=True):
    """One TCP connection: its flow and the sequence state towards the guest (:class:`~shardswitch.net.tcp.TcpConn`)."""

    guest: Side
    host: Side
    #: A host client opened it (port forwarding).
    inbound: bool = False
    isn: U32
    our_mss: U16
    seq_to_guest: U32
    seq_ack_from_guest: U32
    seq_from_guest: U32
    seq_ack_to_guest: U32
    mss: U16
    ws_from_guest: Scale
    ws_to_guest: Scale
    wnd_from_guest: U32
    wnd_to_guest: U32
    flags: U8
    #: The host socket, or None: it could not move (no TCP_REPAIR) and the target resets the connection.
    socket: TcpSocketState | None = None


class UdpState(msgspec.Struct, frozen=True, array_like=True):
    """A UDP flow the guest started: re-created on the target from the same local port when it is free."""

    guest: Side
    host: Side


class PingState(msgspec.Struct, frozen=True, array_like=True):
    """An echo flow: re-created on the target."""

    v6: bool
    guest: Side
    host: Side


class PairState(msgspec.Struct, frozen=True, kw_only=True):
    """The flows of one queue pair's worker."""

    pair: Annotated[int, msgspec.Meta(ge=0, lt=MAX_PAIRS)]
    tcp: Annotated[list[TcpState], msgspec.Meta(max_length=MAX_FLOWS)] = []
    udp: Annotated[list[UdpState], msgspec.Meta(max_length=MAX_FLOWS)] = []
    ping: Annotated[list[PingState], msgspec.Meta(max_length=MAX_FLOWS)] = []


class DeviceState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the switch migrates."""

    #: The guest's MAC address and global IPv6 address as the switch learnt them (None: not seen yet).
    guest_mac: Mac | None = None
    guest6: Addr16 | None = None
    pairs: Annotated[list[PairState], msgspec.Meta(max_length=MAX_PAIRS)] = []

    def flow_count(self) -> int:
        """Flows of every kind in the document."""
        return sum(len(p.tcp) + len(p.udp) + len(p.ping) for p in self.pairs)


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(DeviceState)
PAIR_DECODER = msgspec.msgpack.Decoder(PairState)


def encode(state: DeviceState) -> bytes:
    """The document for ``state``: header then body."""
    return HEADER.pack(MAGIC, VERSION, COMPAT_VERSION) + _ENCODER.encode(state)


def encode_pair(state: PairState) -> bytes:
    """One pair's flows alone (the coordinator-worker transfer, no header)."""
    return _ENCODER.encode(state)


def decode_pair(data: bytes | memoryview) -> PairState:
    """One pair's flows as :func:`encode_pair` wrote them; StateError when they do not decode or check."""
    try:
        state = PAIR_DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError) as err:     # RecursionError: values nested too deeply
        raise StateError(f"flows of a queue pair: {err}") from None
    _check_pair(state)
    return state


def decode(data: bytes | memoryview) -> DeviceState:
    """The state in ``data``, checked whole; StateError saying what is wrong otherwise."""
    if len(data) > MAX_STATE:
        raise StateError(f"device state of {len(data)} bytes: more than the {MAX_STATE} accepted")
    version = check_header(data)
    try:
        state = _DECODER.decode(memoryview(data)[HEADER.size:])
    except (msgspec.DecodeError, RecursionError) as err:     # RecursionError: values nested too deeply
        raise StateError(f"device state body (version {version}): {err}") from None
    seen: set[int] = set()
    for pair in state.pairs:
        if pair.pair in seen:
            raise StateError(f"queue pair {pair.pair} appears twice")
        seen.add(pair.pair)
        _check_pair(pair)
    return state


def check_header(data: bytes | bytearray | memoryview) -> int:
    """The version of the document ``data`` begins, checked; StateError when it is not one a reader of
    :data:`VERSION` can read."""
    if len(data) < HEADER.size:
        raise StateError(f"device state truncated: {len(data)} bytes, less than its {HEADER.size}-byte header")
    magic, version, compat = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError(f"not a shardswitch device state (magic {bytes(magic)!r})")
    if not compat or compat > version:
        raise StateError(f"device state header: version {version}, compatible down to {compat}")
    if not compat <= VERSION:
        raise StateError(f"device state version {version} needs a reader of version {compat} or later; "
                         f"this one reads version {VERSION}")
    return int(version)


def _check_pair(pair: PairState) -> None:
    """What the types cannot say about a pair's flows (see :func:`check_flows`)."""
    check_flows(pair.pair, pair.tcp, pair.udp, pair.ping)


def check_flows(pair: int, tcp: Sequence[TcpState] = (), udp: Sequence[UdpState] = (),
                ping: Sequence[PingState] = ()) -> None:
    """What the types cannot say about flows of queue pair ``pair``: interface kinds and queue lengths."""
    for record in tcp:
        _check_sides(pair, "TCP", record.guest, record.host)
        sock = record.socket
        if sock is not None and sock.not_sent > len(sock.send_queue):
            raise StateError(f"queue pair {pair}: TCP flow with {sock.not_sent} bytes not sent "
                             f"of a {len(sock.send_queue)}-byte send queue")
    for udp_record in udp:
        _check_sides(pair, "UDP", udp_record.guest, udp_record.host)
    for ping_record in ping:
        _check_sides(pair, "echo", ping_record.guest, ping_record.host)


def _check_sides(pair: int, kind: str, guest: Side, host: Side) -> None:
    """A flow's guest side must be the guest's, its host side the host's."""
    if guest.pif != Pif.GUEST or host.pif != Pif.HOST:
        raise StateError(f"queue pair {pair}: {kind} flow with sides of kinds {guest.pif} and {host.pif}")
