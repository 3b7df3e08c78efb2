"""A minimal driver-side (guest-side) split-ring writer for the virtio tests.

The guest memory is one memfd mapped twice: :class:`SharedMemory` maps it in
the test as the driver's view and hands a dup of the fd to a
:class:`GuestMemory` (the device's view), exactly as a worker receives it.
:class:`DriverRing` lays out a split ring inside it and plays the guest
driver: it writes descriptors (including deliberately broken ones), publishes
avail entries, and reads back what the device put in the used ring.
Addresses: guest-physical ``GPA_BASE + offset``, front-end virtual
``UVA_BASE + offset`` for a memfd offset.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from shardswitch.vhost.wire import MemRegion
from shardswitch.virtio.memory import GuestMemory
from shardswitch.virtio.virtqueue import Virtqueue

GPA_BASE = 0x4000_0000
UVA_BASE = 0x7F12_3450_0000

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

NEXT = 1
WRITE = 2
INDIRECT = 4


class SharedMemory:
    """A memfd of ``size`` bytes, mapped here as the driver's view of guest memory."""

    def __init__(self, size: int = 1 << 20) -> None:
        """Create and map the memfd."""
        self.size = size
        self.fd = os.memfd_create("virtio-test", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def region(self, offset: int = 0, size: int | None = None, gpa: int | None = None,
               uva: int | None = None) -> MemRegion:
        """A region covering ``size`` bytes of the memfd from ``offset``."""
        size = self.size - offset if size is None else size
        return MemRegion(GPA_BASE + offset if gpa is None else gpa, size,
                         UVA_BASE + offset if uva is None else uva, offset)

    def attach(self, mem: GuestMemory, region: MemRegion | None = None) -> MemRegion:
        """Give ``mem`` a dup of the fd for ``region`` (default: the whole memfd)."""
        region = self.region() if region is None else region
        mem.add_region(region, os.dup(self.fd))
        return region

    def close(self) -> None:
        """Unmap the driver view and close the fd."""
        self.mm.close()
        os.close(self.fd)


@dataclass
class Layout:
    """memfd offsets of a ring's three areas and of its buffer area."""

    desc: int
    avail: int
    used: int
    data: int


class DriverRing:
    """Guest driver side of one split ring inside a :class:`SharedMemory`."""

    def __init__(self, shm: SharedMemory, num: int, base: int = 0x1000, start_idx: int = 0) -> None:
        """Lay the ring out at memfd offset ``base``; avail and used idx start at ``start_idx``."""
        self.shm = shm
        self.mm = shm.mm
        self.num = num
        desc = base
        avail = desc + 16 * num
        used = (avail + 6 + 2 * num + 3) & ~3
        data = (used + 6 + 8 * num + 0xFFF) & ~0xFFF
        self.layout = Layout(desc, avail, used, data)
        self._bump = data
        self.free = list(range(num))
        self.start_idx = start_idx
        self.avail_idx = start_idx
        self.last_used = start_idx
        self.mm[desc:data] = bytes(data - desc)
        U16.pack_into(self.mm, avail + 2, start_idx)
        U16.pack_into(self.mm, used + 2, start_idx)

    # ----------------------------------------------------------- addresses

    @staticmethod
    def gpa(offset: int) -> int:
        """Guest-physical address of memfd ``offset``."""
        return GPA_BASE + offset

    @staticmethod
    def uva(offset: int) -> int:
        """Front-end virtual address of memfd ``offset``."""
        return UVA_BASE + offset

    def device(self, mem: GuestMemory, *, event_idx: bool = False, indirect: bool = True,
               last_avail: int | None = None) -> Virtqueue:
        """The device-side :class:`Virtqueue` for this ring (base: the start index by default)."""
        lay = self.layout
        return Virtqueue(mem, self.num, self.uva(lay.desc), self.uva(lay.avail), self.uva(lay.used),
                         self.start_idx if last_avail is None else last_avail,
                         event_idx=event_idx, indirect=indirect)

    # ------------------------------------------------------------- buffers

    def alloc(self, size: int, content: bytes = b"") -> int:
        """Reserve ``size`` bytes of buffer space (16-aligned); return the memfd offset."""
        off = self._bump
        self._bump = (off + max(size, 1) + 15) & ~15
        if self._bump > self.shm.size:
            raise MemoryError("test buffer area exhausted")
        self.mm[off:off + size] = content.ljust(size, b"\0")[:size]
        return off

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at memfd ``offset``."""
        return bytes(self.mm[offset:offset + length])

    # --------------------------------------------------------- descriptors

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                   table: int | None = None) -> None:
        """Write descriptor ``index`` of the ring (or of the table at memfd offset ``table``)."""
        base = self.layout.desc if table is None else table
        DESC.pack_into(self.mm, base + 16 * index, addr, length, flags, nxt)

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        """Ring descriptor ``index`` as (addr, len, flags, next)."""
        addr, length, flags, nxt = DESC.unpack_from(self.mm, self.layout.desc + 16 * index)
        return int(addr), int(length), int(flags), int(nxt)

    def buffers(self, head: int) -> list[tuple[int, int]]:
        """(memfd offset, length) of each buffer of the (direct) chain at ``head``."""
        out = []
        index = head
        while True:
            addr, length, flags, nxt = self.read_desc(index)
            out.append((addr - GPA_BASE, length))
            if not flags & NEXT:
                return out
            index = nxt

    def chain(self, bufs: list[tuple[int, bool]]) -> int:
        """Link ring descriptors for buffers ``[(size, writable)]``; return the head.

        Buffer i gets fresh space filled with ``bytes([i + 1]) * size``.
        """
        ids = [self.free.pop(0) for _ in bufs]
        for pos, ((size, writable), index) in enumerate(zip(bufs, ids)):
            off = self.alloc(size, bytes([pos + 1]) * size)
            flags = (WRITE if writable else 0) | (NEXT if pos + 1 < len(bufs) else 0)
            self.write_desc(index, self.gpa(off), size, flags, ids[pos + 1] if pos + 1 < len(bufs) else 0)
        return ids[0]

    def data_chain(self, parts: list[bytes]) -> int:
        """Readable chain with the given buffer contents; return the head."""
        ids = [self.free.pop(0) for _ in parts]
        for pos, (part, index) in enumerate(zip(parts, ids)):
            off = self.alloc(len(part), part)
            last = pos + 1 == len(parts)
            self.write_desc(index, self.gpa(off), len(part), 0 if last else NEXT, 0 if last else ids[pos + 1])
        return ids[0]

    def indirect_table(self, bufs: list[tuple[int, bool]]) -> tuple[int, int]:
        """Build an indirect table for ``[(size, writable)]``; return (memfd offset, byte length)."""
        table = self.alloc(16 * len(bufs))
        for pos, (size, writable) in enumerate(bufs):
            off = self.alloc(size, bytes([0x40 + pos]) * size)
            more = pos + 1 < len(bufs)
            self.write_desc(pos, self.gpa(off), size, (WRITE if writable else 0) | (NEXT if more else 0),
                            pos + 1 if more else 0, table=table)
        return table, 16 * len(bufs)

    # ---------------------------------------------------------- avail ring

    def post(self, head: int, publish: bool = True) -> None:
        """Put ``head`` in the next avail slot; bump avail.idx when ``publish``."""
        lay = self.layout
        U16.pack_into(self.mm, lay.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self, idx: int | None = None) -> None:
        """Store avail.idx (the driver's running value, or ``idx`` to forge one)."""
        U16.pack_into(self.mm, self.layout.avail + 2, self.avail_idx if idx is None else idx)

    def set_avail_flags(self, flags: int) -> None:
        """Store avail.flags."""
        U16.pack_into(self.mm, self.layout.avail, flags)

    def set_used_event(self, value: int) -> None:
        """Store used_event (after the avail ring)."""
        U16.pack_into(self.mm, self.layout.avail + 4 + 2 * self.num, value)

    # ----------------------------------------------------------- used ring

    def used_idx(self) -> int:
        """used.idx as the device published it."""
        return int(U16.unpack_from(self.mm, self.layout.used + 2)[0])

    def used_flags(self) -> int:
        """used.flags."""
        return int(U16.unpack_from(self.mm, self.layout.used)[0])

    def avail_event(self) -> int:
        """avail_event (after the used ring)."""
        return int(U16.unpack_from(self.mm, self.layout.used + 4 + 8 * self.num)[0])

    def collect(self) -> list[tuple[int, int]]:
        """Used elements published since the last call, as (id, len)."""
        out = []
        end = self.used_idx()
        while self.last_used != end:
            slot = self.last_used % self.num
            out.append(USED_ELEM.unpack_from(self.mm, self.layout.used + 4 + 8 * slot))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return [(int(i), int(n)) for i, n in out]
