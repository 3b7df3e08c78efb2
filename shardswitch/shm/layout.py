"""Binary layout of the shared flow-table segment, its constants and codecs.

Theory of operation
-------------------
One POSIX shared-memory segment holds the whole table; every process maps it
and reads/writes it through ``memoryview`` casts at the offsets defined here.
Nothing in this module does I/O: it defines the formats, computes the
geometry of a segment from its capacity, checks the formats at import time and
converts between Python values and the packed bytes.

Segment (all little-endian; offsets from the start of the segment)::

    0        header              256 bytes (HEADER, below)
    256      participants        max_participants x 32 bytes (PARTICIPANT)
    P        entries             capacity x 128 bytes (ENTRY), P = page-aligned
    I        hash index          index_size x u32, I = P + capacity * 128
             (total rounded up to a page)

Header (``HEADER``, u32 word index in brackets, see :class:`HeaderWord`)::

    0   magic 8s "SHSWFLOW"      8   version u32 [2]     12  capacity u32 [3]
    16  index_size u32 [4]       20  max_participants [5] 24 entry_size [6]
    28  creator_pid u32 [7]      32  creator_start u64 (process start time, clock ticks): who created it
    40  secret 16s (hash key)    56  epoch u32 [14]: recovery epoch, odd = recovering
    60  recoverer_pid [15]       64  readers [16]: reader count of the lock
    68  writer_pid [17]          72  mutation pid [18], 76 mutation op [19], 80 mutation entry [20]
    84  free_head [21]           88  n_free [22]   92 n_progress [23]   96 n_active [24]
    100 reserved                 104 u64 statistics [13..18 as u64 words], see :class:`StatWord`
    152 guest MAC u64 [19 as a u64 word]: the guest's MAC in the low 48 bits, bit 63 set once known;
        written by any worker that learns it, without the lock (one aligned 8-byte store)
    160 guest IPv6 sequence u32 [40]   168 guest IPv6 address 16s [21..22 as u64 words]: the global
        address the guest was last seen using, a sequence lock: written under the write lock (sequence
        made odd, address stored, sequence made even), read without it (retried while odd or changed);
        sequence 0 = never written

Participant slot (``PARTICIPANT``, 32 bytes): pid u32, phase u32 (:class:`Phase`),
process start time u64, 16 reserved.  pid 0 = free slot.

Entry (``ENTRY``, 128 bytes)::

    0   state u8 (:class:`State`)   1 type u8 (:class:`FlowType`)   2 owner u16 (queue pair)
    4   generation u32 (incremented whenever the entry is freed)
    8   side 0 (initiating), 46 side 1 (target): 38 bytes each (``SIDE``):
          pif u8, type u8 (a copy of the flow type), ep_port u16, our_port u16,
          ep_addr 16s, our_addr 16s
    84  timeout u32 (seconds of idleness after which the owner ends the flow, 0 = none published)
    88  last_activity f64 (CLOCK_MONOTONIC seconds)
    96  next_free u32 (free list link, NO_ENTRY = end)   100 allocator pid u32
    104 home bucket of side 0 u32   108 home bucket of side 1 u32   112 padding

A side's 38 bytes are exactly its hash key: the flow type is copied into the
byte after ``pif`` so that a key is compared with one slice.  Addresses are
16 bytes; IPv4 is stored IPv4-mapped (``::ffff:a.b.c.d``).  The hash index
holds ``sidx + 1`` per bucket (0 = empty) where ``sidx = entry * 2 + side``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, TypeVar

from shardswitch.net import inany


class FlowTableError(Exception):
    """Any failure of the shared flow table (the one exception type of this layer)."""


class TableFullError(FlowTableError):
    """No free entry is left."""


class StaleReferenceError(FlowTableError):
    """A (index, generation) reference no longer names the flow it was taken for."""


#: Magic at offset 0 of a segment.
MAGIC = b"SHSWFLOW"
#: Layout version (in the header, for whoever reads a segment's bytes: a debugger, a core dump).
VERSION = 1
#: Default number of flows, as passt.
DEFAULT_CAPACITY = 131071
#: Default number of participant slots (coordinator plus workers).
DEFAULT_PARTICIPANTS = 64
#: Largest capacity (sidx + 1 must fit a u32 with room to spare).
MAX_CAPACITY = 1 << 30
#: "No entry" in free-list links and the mutation record.
NO_ENTRY = 0xFFFFFFFF
#: Target load of the hash index when the table is full, in percent (as passt).
INDEX_LOAD_PERCENT = 70
#: Page size used to align the entries and the total size.
PAGE = 4096


class State(IntEnum):
    """Life cycle of an entry: FREE -> NEW -> INI -> TGT -> TYPED -> ACTIVE."""

    FREE = 0
    NEW = 1      #: allocated, nothing known yet
    INI = 2      #: initiating side known
    TGT = 3      #: target side chosen
    TYPED = 4    #: type and owner set
    ACTIVE = 5   #: in the hash index, visible to everyone


class FlowType(IntEnum):
    """What kind of flow an entry holds (0 = none yet; room for more)."""

    NONE = 0
    PING4 = 1
    PING6 = 2
    UDP = 3
    TCP = 4


class Pif(IntEnum):
    """The interface kind of one side of a flow."""

    NONE = 0
    GUEST = 1
    HOST = 2


class Phase(IntEnum):
    """Where a participant is with respect to the readers-writer lock."""

    IDLE = 0
    R_WAIT = 1   #: entering as reader (transitional)
    R_HELD = 2   #: reader inside, counted in the reader count
    R_EXIT = 3   #: leaving as reader (transitional)
    W_WAIT = 4   #: entering as writer (transitional)
    W_HELD = 5   #: writer inside, holds turnstile and room-empty
    W_EXIT = 6   #: leaving as writer (transitional)


#: Phases in which what a participant holds is ambiguous.
TRANSITIONAL = frozenset((Phase.R_WAIT, Phase.R_EXIT, Phase.W_WAIT, Phase.W_EXIT))


class MutationOp(IntEnum):
    """The mutation recorded in the header while a writer changes the table."""

    NONE = 0
    ALLOC = 1
    ACTIVATE = 2
    CANCEL = 3
    REMOVE = 4


class HookPoint(IntEnum):
    """Test-only stopping points (see ``FlowTable.set_hook``)."""

    READ_COUNTED = 1      #: reader counted (and in the room), count mutex held, phase still R_WAIT
    WRITE_TURNSTILE = 2   #: writer holds the turnstile, phase still W_WAIT
    READ_HELD = 3         #: inside a read-locked lookup/listing
    ACTIVATE_HALF = 4     #: activation: side 0 in the index, side 1 not yet
    REMOVE_HALF = 5       #: removal: side 0 out of the index, side 1 not yet


class HeaderWord(IntEnum):
    """Index of each u32 header field in a ``cast('I')`` of the segment."""

    VERSION = 2
    CAPACITY = 3
    INDEX_SIZE = 4
    MAX_PARTICIPANTS = 5
    ENTRY_SIZE = 6
    CREATOR_PID = 7
    EPOCH = 14
    RECOVERER_PID = 15
    READERS = 16
    WRITER_PID = 17
    MUT_PID = 18
    MUT_OP = 19
    MUT_ENTRY = 20
    FREE_HEAD = 21
    N_FREE = 22
    N_PROGRESS = 23
    N_ACTIVE = 24


class StatWord(IntEnum):
    """Index of each u64 statistic in a ``cast('Q')`` of the segment."""

    ALLOCS = 13
    ACTIVATIONS = 14
    DUPLICATES = 15
    REMOVALS = 16
    CANCELS = 17
    RECOVERIES = 18


#: Offset of the creator's start time, as a u64 word index.
CREATOR_START_QWORD = 4
#: The guest's MAC address (low 48 bits) with :data:`GUEST_MAC_KNOWN`, as a u64 word index.
GUEST_MAC_QWORD = 19
GUEST_MAC_KNOWN = 1 << 63
#: The guest's IPv6 address sequence lock, as a u32 word index, and the address, as a u64 word index.
GUEST6_SEQ_WORD = 40
GUEST6_QWORD = 21

HEADER = struct.Struct("<8s6IQ16s12I6Q")
HEADER_SIZE = 256
PARTICIPANT = struct.Struct("<IIQ16x")
SIDE = struct.Struct("<BBHH16s16s")
ENTRY = struct.Struct("<BBHI" + SIDE.format[1:] * 2 + "IdIIII16x")
#: Bytes per entry, and the same in u32/u16/f64 words.
ENTRY_SIZE = 128
ENTRY_WORDS = ENTRY_SIZE // 4


class EntryByte(IntEnum):
    """Byte offset of the byte-wide entry fields (and of the sides)."""

    STATE = 0
    TYPE = 1
    SIDE0 = 8          #: side 1 follows at SIDE0 + SIDE.size


class EntryWord(IntEnum):
    """u32 word of each u32 entry field within the entry."""

    GENERATION = 1
    TIMEOUT = 21
    NEXT_FREE = 24
    ALLOC_PID = 25
    HOME0 = 26         #: side 1: HOME0 + 1


#: u16 word of the owner queue pair within an entry.
OWNER_HWORD = 1
#: f64 word of the last activity time within an entry.
LAST_ACTIVITY_DWORD = 11


class PartWord(IntEnum):
    """u32 word of each participant field within its slot."""

    PID = 0
    PHASE = 1
    WORDS = 8          #: u32 words per slot


#: u64 word of the process start time within a participant slot.
PART_START_QWORD = 1


def _check_layout() -> None:
    """Assert at import that the documented offsets match the struct formats."""
    assert HEADER.size <= HEADER_SIZE, HEADER.size
    assert struct.calcsize("<8s") == HeaderWord.VERSION * 4
    assert struct.calcsize("<8s5I") == HeaderWord.CREATOR_PID * 4
    assert struct.calcsize("<8s6I") == CREATOR_START_QWORD * 8
    assert struct.calcsize("<8s6IQ16s") == HeaderWord.EPOCH * 4
    assert struct.calcsize("<8s6IQ16s10I") == HeaderWord.N_ACTIVE * 4
    assert struct.calcsize("<8s6IQ16s12I") == StatWord.ALLOCS * 8
    assert StatWord.RECOVERIES * 8 + 8 == HEADER.size == GUEST_MAC_QWORD * 8
    assert GUEST_MAC_QWORD * 8 + 8 <= HEADER_SIZE
    assert GUEST6_SEQ_WORD * 4 == GUEST_MAC_QWORD * 8 + 8 and GUEST6_QWORD * 8 == GUEST6_SEQ_WORD * 4 + 8
    assert GUEST6_QWORD * 8 + 16 <= HEADER_SIZE
    assert PARTICIPANT.size == PartWord.WORDS * 4 and HEADER_SIZE % PARTICIPANT.size == 0
    assert struct.calcsize("<II") == PART_START_QWORD * 8
    assert SIDE.size == 38
    assert ENTRY.size == ENTRY_SIZE == 128
    assert struct.calcsize("<BBH") == EntryWord.GENERATION * 4 == OWNER_HWORD * 2 + 2
    assert EntryByte.SIDE0 == 8 and EntryByte.SIDE0 + 2 * SIDE.size + 4 == LAST_ACTIVITY_DWORD * 8
    assert struct.calcsize("<BBHI" + SIDE.format[1:] * 2) == EntryWord.TIMEOUT * 4
    assert struct.calcsize("<BBHI" + SIDE.format[1:] * 2 + "Id") == EntryWord.NEXT_FREE * 4
    assert EntryWord.ALLOC_PID == EntryWord.NEXT_FREE + 1 and EntryWord.HOME0 == EntryWord.ALLOC_PID + 1
    assert list(State) == sorted(State) and State.FREE == 0


_check_layout()


@dataclass(frozen=True, slots=True)
class Geometry:
    """Sizes and offsets of a segment, derived from its capacity."""

    capacity: int
    max_participants: int
    index_size: int
    entries_offset: int
    index_offset: int
    total_size: int

    @classmethod
    def for_capacity(cls, capacity: int, max_participants: int = DEFAULT_PARTICIPANTS) -> Geometry:
        """The geometry of a table of ``capacity`` flows and ``max_participants`` processes."""
        if not 1 <= capacity <= MAX_CAPACITY:
            raise FlowTableError(f"capacity {capacity} outside 1..{MAX_CAPACITY}")
        if not 2 <= max_participants <= 4096:
            raise FlowTableError(f"max_participants {max_participants} outside 2..4096")
        index_size = max(2 * capacity * 100 // INDEX_LOAD_PERCENT, 2 * capacity + 1)
        entries = _round_up(HEADER_SIZE + max_participants * PARTICIPANT.size, PAGE)
        index = entries + capacity * ENTRY_SIZE
        total = _round_up(index + 4 * index_size, PAGE)
        return cls(capacity, max_participants, index_size, entries, index, total)


def _round_up(value: int, unit: int) -> int:
    """``value`` rounded up to a multiple of ``unit``."""
    return -(-value // unit) * unit


class FlowRef(NamedTuple):
    """A reference to a flow: entry index and the generation it had when taken."""

    entry: int
    generation: int


class Hit(NamedTuple):
    """A lookup result: the flow, which of its sides matched, and its owner queue pair."""

    entry: int
    generation: int
    side: int
    owner: int

    @property
    def ref(self) -> FlowRef:
        """The flow reference of this hit."""
        return FlowRef(self.entry, self.generation)


class FlowSide(NamedTuple):
    """One side of a flow: interface kind, the peer's ("ep") and our address/port."""

    pif: int
    ep_addr: bytes
    ep_port: int
    our_addr: bytes
    our_port: int


@dataclass(frozen=True, slots=True)
class Flow:
    """A decoded entry."""

    entry: int
    generation: int
    state: State
    type: FlowType
    owner: int
    initiator: FlowSide
    target: FlowSide
    last_activity: float
    #: Seconds of idleness after which its owner ends it, as the owner last published (0: none).
    timeout: int = 0

    @property
    def ref(self) -> FlowRef:
        """The flow reference of this entry."""
        return FlowRef(self.entry, self.generation)


_E = TypeVar("_E", State, FlowType, Pif)


def ip16(addr: bytes | str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """An address as the 16 bytes stored in a side: an inany value (IPv4 as ``::ffff:a.b.c.d``)."""
    try:
        if isinstance(addr, str):
            return inany.from_str(addr)
        if isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return inany.from_packed(addr.packed)
        if isinstance(addr, (bytes, bytearray, memoryview)):
            return inany.from_packed(bytes(addr))
    except inany.AddressError:
        pass
    raise FlowTableError(f"not an IPv4/IPv6 address: {addr!r}")


def ip_of(addr16: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address object for 16 stored bytes (IPv4-mapped addresses as IPv4)."""
    if inany.is_v4(addr16):
        return ipaddress.IPv4Address(addr16[12:])
    return ipaddress.IPv6Address(addr16)


def pack_key(ftype: int, side: FlowSide) -> bytes:
    """The 38-byte hash key of ``side`` of a flow of type ``ftype``, validated."""
    if not 0 < ftype <= 255 or not 0 < side.pif <= 255:
        raise FlowTableError(f"bad flow type {ftype} or pif {side.pif}")
    try:
        return SIDE.pack(side.pif, ftype, side.ep_port, side.our_port, side.ep_addr, side.our_addr)
    except struct.error as exc:
        raise FlowTableError(f"bad flow side {side!r}: {exc}") from None


def check_side(side: FlowSide) -> None:
    """Refuse a side that cannot be stored: unknown pif, address not 16 bytes, port out of range."""
    if side.pif not in (Pif.GUEST, Pif.HOST):
        raise FlowTableError(f"bad pif {side.pif!r}")
    for addr in (side.ep_addr, side.our_addr):
        if not isinstance(addr, bytes) or len(addr) != 16:
            raise FlowTableError(f"address must be 16 bytes (see ip16): {addr!r}")
    for port in (side.ep_port, side.our_port):
        if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise FlowTableError(f"bad port {port!r}")


def decode_entry(buf: memoryview | bytes, offset: int, index: int) -> Flow:
    """The entry at ``offset`` of ``buf`` (entry number ``index``) as a :class:`Flow`."""
    (state, ftype, owner, generation, pif0, _t0, ep_port0, our_port0, ep_addr0, our_addr0,
     pif1, _t1, ep_port1, our_port1, ep_addr1, our_addr1, timeout, last, _next, _pid, _h0, _h1
     ) = ENTRY.unpack_from(buf, offset)
    return Flow(index, generation, _member(State, state), _member(FlowType, ftype), owner,
                FlowSide(_member(Pif, pif0), ep_addr0, ep_port0, our_addr0, our_port0),
                FlowSide(_member(Pif, pif1), ep_addr1, ep_port1, our_addr1, our_port1), last, timeout)


def _member(kind: type[_E], value: int) -> _E:
    """``value`` as a member of ``kind``, or FlowTableError if it is none."""
    try:
        return kind(value)
    except ValueError:
        raise FlowTableError(f"invalid {kind.__name__} {value}") from None
