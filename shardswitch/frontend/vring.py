"""Driver side of a split virtqueue, for the test front-end.

Theory of operation
-------------------
A split virtqueue of ``num`` entries (a power of two) is three areas of guest
memory, all allocated here from a :class:`~shardswitch.frontend.memory.GuestRam`::

    descriptor table  num x {u64 addr, u32 len, u16 flags, u16 next}   16-aligned
    avail ring        u16 flags, u16 idx, u16 ring[num], u16 used_event  2-aligned
    used ring         u16 flags, u16 idx, {u32 id, u32 len}[num],
                      u16 avail_event                                    4-aligned

The driver (this module) owns the descriptor table and the avail ring; the
device (our back-end) owns the used ring.  Indices (``avail.idx``, ``used.idx``)
are free-running u16 counters; ring positions are ``idx % num``.

Adding a chain takes free descriptor-table slots from a free list, copies
readable data into driver-owned buffers (or reserves writable buffers), links
the slots with NEXT and writes the head into the avail ring at the shadow
index.  :meth:`DriverRing.publish` then stores the shadow index into
``avail.idx`` - after the entries, which on x86-64 (stores are ordered) is
all the ordering needed.  With ``indirect`` a chain takes a single table slot
pointing at an indirect table of its own.

:meth:`DriverRing.get_used` reads ``used.idx``, validates every new used
element (id in flight and not repeated, written length within the chain's
writable capacity, not more new elements than chains in flight) before it
consumes any of them, then frees the descriptors and buffers and returns
what the device wrote.  A misbehaving device thus gets a clear
:class:`RingError` instead of a corrupted driver.

Notifications follow the virtio 1.x rules.  Without EVENT_IDX the driver kicks
unless ``used.flags`` has NO_NOTIFY, and asks for no interrupts by setting
``avail.flags`` NO_INTERRUPT.  With EVENT_IDX it kicks when the published
index crossed ``avail_event`` since the last kick decision:
``(u16)(new - avail_event - 1) < (u16)(new - old)``, and it steers interrupts
with ``used_event`` (re-armed to ``last_used`` by every :meth:`get_used`
while interrupts are wanted, as Linux does).

Between publishing ``avail.idx`` and reading ``avail_event``/``used.flags``
(and between writing ``used_event`` and re-reading ``used.idx``) a full
memory fence is required; :func:`shardswitch.virtio.barrier.fence` provides
one (see its module for why it works in CPython).  Flag values, the queue
size limit and the EVENT_IDX crossing test are shared with the device side
(:mod:`shardswitch.virtio.virtqueue`); the tests check the driver against an
independent device model, not against that module.

Buffers and indirect tables come from fixed-size chunk pools that grow lazily
from the guest RAM bump allocator and are recycled when the device returns a
chain, so a long benchmark does not exhaust guest memory.  Data longer than
``buf_size`` is split over several descriptors.

:meth:`DriverRing.add_raw_descriptors` writes arbitrary descriptor entries for
malformed-ring tests; such chains are tracked only to free their slots.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from shardswitch.frontend.memory import GuestRam, GuestRamError
from shardswitch.virtio.barrier import fence
from shardswitch.virtio.virtqueue import (MAX_QUEUE_SIZE, AvailFlags, DescFlags, UsedFlags,
                                          vring_need_event)

#: Default size of one driver buffer (one descriptor's worth of data).
DEFAULT_BUF_SIZE = 2048

#: One descriptor table entry: u64 addr, u32 len, u16 flags, u16 next.
DESC = struct.Struct("<QIHH")
assert DESC.size == 16

BytesLike = bytes | bytearray | memoryview
#: A raw descriptor table entry: (addr, len, flags, next).
RawDescriptor = tuple[int, int, int, int]
#: A pooled chunk of guest memory: (gpa, writable view).
_Chunk = tuple[int, memoryview]


#: Plain-int copies of the flags for the per-packet paths (IntFlag operators are slow).
_F_NEXT = int(DescFlags.NEXT)
_F_WRITE = int(DescFlags.WRITE)
_F_INDIRECT = int(DescFlags.INDIRECT)
_F_NO_INTERRUPT = int(AvailFlags.NO_INTERRUPT)
_F_NO_NOTIFY = int(UsedFlags.NO_NOTIFY)


class RingError(Exception):
    """Invalid use of the driver ring, or the device broke the ring protocol."""


class RingFullError(RingError):
    """Not enough free descriptors for the chain right now (retry after get_used)."""


def _byte_view(data: BytesLike) -> memoryview:
    """A flat unsigned-byte view of ``data`` (no copy)."""
    view = memoryview(data)
    return view if view.format == "B" else view.cast("B")


def _u16(value: int) -> int:
    """Reduce to a free-running u16 index."""
    return value & 0xFFFF


class _ChunkPool:
    """Fixed-size chunks of guest memory, allocated lazily in batches and recycled."""

    def __init__(self, ram: GuestRam, chunk: int, batch: int, align: int) -> None:
        """Prepare a pool of ``chunk``-byte chunks, ``batch`` per allocation."""
        self._ram = ram
        self._chunk = chunk
        self._batch = batch
        self._align = align
        self._free: list[_Chunk] = []
        self._views: list[memoryview] = []

    def take(self) -> _Chunk:
        """Return a free chunk, growing the pool from guest RAM if needed."""
        if not self._free:
            self._grow()
        return self._free.pop()

    def give(self, chunk: _Chunk) -> None:
        """Return a chunk to the pool."""
        self._free.append(chunk)

    def reserve(self, count: int) -> None:
        """Grow the pool until ``count`` chunks are free."""
        while len(self._free) < count:
            self._grow()

    def _grow(self) -> None:
        """Allocate another batch (or, when RAM is short, a single chunk)."""
        for count in (self._batch, 1):
            try:
                gpa = self._ram.alloc(self._chunk * count, self._align)
            except GuestRamError:
                continue
            area = self._ram.view(gpa, self._chunk * count)
            self._views.append(area)
            for i in range(count - 1, -1, -1):
                view = area[i * self._chunk:(i + 1) * self._chunk]
                self._views.append(view)
                self._free.append((gpa + i * self._chunk, view))
            return
        raise RingError(f"guest RAM exhausted allocating a {self._chunk}-byte driver buffer")

    def release(self) -> None:
        """Release every view handed out (the pool is unusable afterwards)."""
        for view in self._views:
            view.release()
        self._views.clear()
        self._free.clear()


@dataclass(slots=True)
class _Chain:
    """Book-keeping of one chain the device holds."""

    slots: list[int]                 # descriptor-table slots taken
    bufs: list[_Chunk]               # data buffers to recycle
    writable: list[memoryview]       # writable segments, in chain order, each exactly its length
    capacity: int | None             # total writable bytes; None: raw chain, not checked
    table: _Chunk | None             # indirect table to recycle


class DriverRing:
    """The driver (front-end) side of one split virtqueue in guest RAM."""

    def __init__(self, ram: GuestRam, num: int, *, event_idx: bool, indirect: bool = False,
                 base: int = 0, buf_size: int = DEFAULT_BUF_SIZE) -> None:
        """Allocate the ring areas in ``ram`` and start both indices at ``base``.

        ``indirect`` allows indirect chains (INDIRECT_DESC negotiated);
        ``base`` (u16) lets tests start close to the 65535 wrap-around, and is
        what SET_VRING_BASE must announce.
        """
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if not 0 <= base <= 0xFFFF:
            raise RingError(f"base index {base} is not a u16")
        if buf_size <= 0:
            raise RingError(f"buffer size {buf_size} must be positive")
        self.ram = ram
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.buf_size = buf_size
        self._mask = num - 1
        try:
            self.desc_gpa = ram.alloc(16 * num, 16)
            self.avail_gpa = ram.alloc(6 + 2 * num, 2)
            self.used_gpa = ram.alloc(6 + 8 * num, 4)
        except GuestRamError as exc:
            raise RingError(f"cannot place a ring of {num} in guest RAM: {exc}") from exc
        self.desc_vva = ram.gpa_to_vva(self.desc_gpa)
        self.avail_vva = ram.gpa_to_vva(self.avail_gpa)
        self.used_vva = ram.gpa_to_vva(self.used_gpa)
        self._desc = ram.view(self.desc_gpa, 16 * num)
        self._avail = ram.view(self.avail_gpa, 6 + 2 * num).cast("H")
        self._used16 = ram.view(self.used_gpa, 6 + 8 * num).cast("H")
        self._used32 = ram.view(self.used_gpa + 4, 8 * num).cast("I")
        self._used_event_pos = 2 + num          # in avail, u16 units
        self._avail_event_pos = 2 + 4 * num     # in used, u16 units
        self._free: list[int] = list(range(num - 1, -1, -1))
        self._is_free = bytearray(b"\x01" * num)
        self._chains: dict[int, _Chain] = {}
        self._bufs = _ChunkPool(ram, buf_size, min(num, 256), 64)
        self._tables = _ChunkPool(ram, 16 * num, 4, 16)
        self._avail_shadow = base
        self._published = base
        self._kick_old = base
        self._last_used = base
        self._suppressed = False
        self._avail[1] = base
        self._used16[1] = base
        if event_idx:
            self._avail[self._used_event_pos] = base

    def reserve(self, buffers: int, tables: int = 0) -> None:
        """Allocate now ``buffers`` data buffers and ``tables`` indirect tables, so that later chains
        take no guest RAM: a driver forked after this never allocates RAM its siblings could take too."""
        self._bufs.reserve(buffers)
        self._tables.reserve(tables)

    # -- counters ----------------------------------------------------------

    @property
    def avail_idx(self) -> int:
        """Next avail index the driver will write (includes unpublished chains)."""
        return self._avail_shadow

    @property
    def published_idx(self) -> int:
        """The avail index last stored into avail.idx by publish()."""
        return self._published

    @property
    def last_used(self) -> int:
        """The used index up to which the driver has consumed used elements."""
        return self._last_used

    @property
    def used_idx(self) -> int:
        """used.idx as the device last wrote it."""
        return int(self._used16[1])

    @property
    def free_count(self) -> int:
        """Free descriptor-table slots."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains made available and not yet returned by the device."""
        return len(self._chains)

    # -- adding chains -----------------------------------------------------

    def add_out(self, data: BytesLike | Sequence[BytesLike], *, indirect: bool = False) -> int:
        """Add a device-readable chain (TX); a list gives one descriptor per item.

        Returns the head slot.  Raises :class:`RingFullError` when the free
        descriptors do not suffice right now.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            source = _byte_view(data)
            if not indirect and len(source) <= self.buf_size:
                return self._add_single(source, len(source))
            return self.add_chain([source], (), indirect=indirect)
        return self.add_chain(list(data), (), indirect=indirect)

    def add_in(self, sizes: Sequence[int], *, indirect: bool = False) -> int:
        """Add a device-writable chain (RX buffers) of the given segment sizes; return the head."""
        if len(sizes) == 1 and not indirect and 0 <= sizes[0] <= self.buf_size:
            return self._add_single(None, sizes[0])
        return self.add_chain((), sizes, indirect=indirect)

    def _add_single(self, source: memoryview | None, length: int) -> int:
        """Fast path: a one-descriptor direct chain, readable (``source``) or writable."""
        if not self._free:
            raise RingFullError("no free descriptor")
        chunk = self._bufs.take()
        gpa, view = chunk
        slot = self._take_slot()
        if source is not None:
            view[:length] = source
            DESC.pack_into(self._desc, 16 * slot, gpa, length, 0, 0)
            self._chains[slot] = _Chain([slot], [chunk], [], 0, None)
        else:
            DESC.pack_into(self._desc, 16 * slot, gpa, length, _F_WRITE, 0)
            self._chains[slot] = _Chain([slot], [chunk], [view[:length]], length, None)
        self._make_available(slot)
        return slot

    def add_chain(self, out: Sequence[BytesLike], in_sizes: Sequence[int], *,
                  indirect: bool = False) -> int:
        """Add a chain of readable segments ``out`` then writable ``in_sizes``; return the head.

        Segments longer than ``buf_size`` take several descriptors.  Nothing
        is changed when an error is raised.
        """
        if indirect and not self.indirect:
            raise RingError("indirect descriptors were not enabled on this ring")
        sources = [_byte_view(piece) for piece in out]
        entries: list[tuple[int, int]] = []          # (length, flags) per descriptor
        for source in sources:
            entries.extend((length, 0) for length in self._split(len(source)))
        for size in in_sizes:
            if size < 0:
                raise RingError(f"negative buffer size {size}")
            entries.extend((length, _F_WRITE) for length in self._split(size))
        count = len(entries)
        if count == 0:
            raise RingError("a chain needs at least one descriptor")
        if count > self.num:
            raise RingError(f"a chain of {count} descriptors is longer than the queue ({self.num})")
        slots_needed = 1 if indirect else count
        if slots_needed > len(self._free):
            raise RingFullError(f"{slots_needed} descriptors needed, {len(self._free)} free")
        bufs: list[_Chunk] = []
        table: _Chunk | None = None
        try:
            for _ in range(count):
                bufs.append(self._bufs.take())
            if indirect:
                table = self._tables.take()
        except RingError:
            for chunk in bufs:
                self._bufs.give(chunk)
            raise
        self._fill(sources, bufs)
        descs = [(gpa, length, flags) for (gpa, _view), (length, flags) in zip(bufs, entries)]
        writable = [view[:length] for (_gpa, view), (length, flags) in zip(bufs, entries)
                    if flags & _F_WRITE]
        capacity = sum(len(view) for view in writable)
        if table is not None:
            self._write_linked(table[1], list(range(count)), descs)
            slots = [self._take_slot()]
            self._write_linked(self._desc, slots, [(table[0], 16 * count, _F_INDIRECT)])
        else:
            slots = [self._take_slot() for _ in range(count)]
            self._write_linked(self._desc, slots, descs)
        head = slots[0]
        self._chains[head] = _Chain(slots, bufs, writable, capacity, table)
        self._make_available(head)
        return head

    def _split(self, length: int) -> list[int]:
        """Descriptor lengths for a segment of ``length`` bytes (at least one descriptor)."""
        if length <= self.buf_size:
            return [length]
        full, rest = divmod(length, self.buf_size)
        return [self.buf_size] * full + ([rest] if rest else [])

    def _fill(self, sources: list[memoryview], bufs: list[_Chunk]) -> None:
        """Copy the readable pieces into the first buffers of the chain."""
        index = 0
        for source in sources:
            offset = 0
            for length in self._split(len(source)):
                bufs[index][1][:length] = source[offset:offset + length]
                offset += length
                index += 1

    @staticmethod
    def _write_linked(table: memoryview, slots: list[int], descs: list[tuple[int, int, int]]) -> None:
        """Write ``descs`` (addr, len, flags) into ``table`` at ``slots``, linked with NEXT."""
        last = len(slots) - 1
        for i, (slot, (addr, length, flags)) in enumerate(zip(slots, descs)):
            if i < last:
                DESC.pack_into(table, 16 * slot, addr, length, flags | _F_NEXT, slots[i + 1])
            else:
                DESC.pack_into(table, 16 * slot, addr, length, flags, 0)

    def _take_slot(self) -> int:
        """Pop a free descriptor-table slot."""
        slot = self._free.pop()
        self._is_free[slot] = 0
        return slot

    def _make_available(self, head: int) -> None:
        """Write ``head`` into the avail ring at the shadow index."""
        self._avail[2 + (self._avail_shadow & self._mask)] = head
        self._avail_shadow = _u16(self._avail_shadow + 1)

    def add_raw_descriptors(self, descs: Sequence[RawDescriptor], head: int) -> None:
        """Write arbitrary (addr, len, flags, next) entries at slots head, head+1, ... and make ``head`` available.

        For malformed-ring tests: nothing is validated except that the slots
        exist and are not held by another chain.  With an empty ``descs``,
        any u16 ``head`` (even out of range or already in flight) is put in
        the avail ring untracked.  A tracked raw chain frees its slots when
        the device returns ``head``; its used length is not checked.
        """
        if not 0 <= head <= 0xFFFF:
            raise RingError(f"head {head} is not a u16")
        if descs:
            slots = list(range(head, head + len(descs)))
            if slots[-1] >= self.num:
                raise RingError(f"slots {head}..{slots[-1]} exceed the table ({self.num})")
            if head in self._chains or not all(self._is_free[slot] for slot in slots):
                raise RingError(f"slots {head}..{slots[-1]} are held by a chain in flight")
            for slot in slots:
                self._free.remove(slot)
                self._is_free[slot] = 0
            for slot, (addr, length, flags, nxt) in zip(slots, descs):
                DESC.pack_into(self._desc, 16 * slot, addr & 0xFFFF_FFFF_FFFF_FFFF,
                               length & 0xFFFF_FFFF, flags & 0xFFFF, nxt & 0xFFFF)
            self._chains[head] = _Chain(slots, [], [], None, None)
        self._make_available(head)

    def publish(self) -> None:
        """Make every added chain visible to the device (store avail.idx)."""
        self._avail[1] = self._avail_shadow
        self._published = self._avail_shadow

    # -- notifications -----------------------------------------------------

    def needs_kick(self) -> bool:
        """Whether the device must be kicked for what was published since the last call."""
        fence()
        new, old = self._published, self._kick_old
        self._kick_old = new
        if new == old:
            return False
        if self.event_idx:
            return vring_need_event(self._used16[self._avail_event_pos], new, old)
        return not self._used16[0] & _F_NO_NOTIFY

    def suppress_interrupts(self, on: bool) -> None:
        """Ask the device not to interrupt (``on``), or to interrupt for the next used element.

        After turning interrupts back on, check :meth:`has_used` before
        sleeping: elements used in between raised no interrupt.
        """
        self._suppressed = on
        if self.event_idx:
            self._avail[self._used_event_pos] = _u16(self._last_used - 1) if on else self._last_used
        else:
            self._avail[0] = _F_NO_INTERRUPT if on else 0
        fence()

    @property
    def interrupts_suppressed(self) -> bool:
        """Whether suppress_interrupts(True) is in force."""
        return self._suppressed

    # -- used ring ---------------------------------------------------------

    def has_used(self) -> bool:
        """Whether the device returned elements not consumed yet."""
        return self._used16[1] != self._last_used

    def get_used(self) -> list[tuple[int, int, bytes]]:
        """Consume all new used elements: (head, written length, written data).

        The data is what the device wrote into the writable segments (empty
        for readable-only and raw chains).  Raises :class:`RingError`, having
        consumed nothing, if any new element breaks the protocol.
        """
        used_idx = self._used16[1]
        pending = _u16(used_idx - self._last_used)
        if pending == 0:
            return []
        if pending > len(self._chains):
            raise RingError(f"device advanced used.idx by {pending} with {len(self._chains)} chains in flight "
                            f"(last_used {self._last_used}, used.idx {used_idx})")
        elements: list[tuple[int, int, _Chain]] = []
        seen: set[int] = set()
        for k in range(pending):
            pos = (self._last_used + k) & self._mask
            head, length = self._used32[2 * pos], self._used32[2 * pos + 1]
            chain = self._chains.get(head)
            if chain is None or head in seen:
                raise RingError(f"used element {_u16(self._last_used + k)} names descriptor {head}, "
                                f"which is not in flight")
            if chain.capacity is not None and length > chain.capacity:
                raise RingError(f"used element for head {head} claims {length} bytes written, "
                                f"the chain has {chain.capacity} writable")
            seen.add(head)
            elements.append((head, length, chain))
        result = [(head, length, self._release_chain(head, length, chain))
                  for head, length, chain in elements]
        self._last_used = used_idx
        if self.event_idx and not self._suppressed:
            self._avail[self._used_event_pos] = used_idx
        return result

    def _release_chain(self, head: int, length: int, chain: _Chain) -> bytes:
        """Forget a returned chain, recycle its resources, and return the written data."""
        del self._chains[head]
        if len(chain.writable) == 1:
            data = bytes(chain.writable[0][:length])
        else:
            parts: list[memoryview] = []
            remaining = length
            for view in chain.writable:
                if remaining <= 0:
                    break
                parts.append(view[:remaining])
                remaining -= len(view)
            data = b"".join(parts)
        for view in chain.writable:
            view.release()
        for slot in chain.slots:
            self._is_free[slot] = 1
            self._free.append(slot)
        for chunk in chain.bufs:
            self._bufs.give(chunk)
        if chain.table is not None:
            self._tables.give(chain.table)
        return data

    def release(self) -> None:
        """Drop every view into guest RAM so that it can be closed; the ring is unusable afterwards."""
        for chain in self._chains.values():
            for view in chain.writable:
                view.release()
        self._chains.clear()
        self._bufs.release()
        self._tables.release()
        for view in (self._desc, self._avail, self._used16, self._used32):
            view.release()
