"""A tiny device-side (back-end) view of split virtqueues, for testing the driver.

It maps the guest RAM memfd independently, the way a back-end does, translates
front-end virtual addresses and guest-physical addresses through the regions,
and reads/writes the rings with plain ``struct`` calls, so it shares no code
with the driver under test.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence

from shardswitch.vhost.wire import MemRegion

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")
NEXT, WRITE, INDIRECT = 1, 2, 4


class DeviceMemory:
    """The guest RAM as a back-end sees it: fd mapped once, regions for translation."""

    def __init__(self, fd: int, regions: Sequence[MemRegion]) -> None:
        """Map ``fd`` (not taking ownership) large enough for every region."""
        self.regions = list(regions)
        size = max(r.mmap_offset + r.memory_size for r in self.regions)
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def gpa(self, gpa: int, length: int = 0) -> int:
        """File offset of a guest-physical range (asserts it lies in a region)."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa and gpa + length <= r.guest_phys_addr + r.memory_size:
                return r.mmap_offset + gpa - r.guest_phys_addr
        raise AssertionError(f"gpa {gpa:#x}+{length} outside the regions")

    def vva(self, vva: int, length: int = 0) -> int:
        """File offset of a front-end virtual range."""
        for r in self.regions:
            if r.userspace_addr <= vva and vva + length <= r.userspace_addr + r.memory_size:
                return r.mmap_offset + vva - r.userspace_addr
        raise AssertionError(f"vva {vva:#x}+{length} outside the regions")

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at a file offset."""
        return bytes(self.map[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        """Store bytes at a file offset."""
        self.map[offset:offset + len(data)] = data

    def close(self) -> None:
        """Unmap."""
        self.map.close()


class DeviceRing:
    """Device side of one split virtqueue."""

    def __init__(self, mem: DeviceMemory, num: int, desc_vva: int, avail_vva: int, used_vva: int,
                 base: int = 0) -> None:
        """Locate the ring areas; ``base`` is the SET_VRING_BASE value."""
        self.mem = mem
        self.num = num
        self.desc = mem.vva(desc_vva, 16 * num)
        self.avail = mem.vva(avail_vva, 6 + 2 * num)
        self.used = mem.vva(used_vva, 6 + 8 * num)
        self.last_avail = base
        self.used_idx = base

    def _u16(self, offset: int) -> int:
        """Read a u16 at a file offset."""
        return int(U16.unpack_from(self.mem.map, offset)[0])

    def _set_u16(self, offset: int, value: int) -> None:
        """Write a u16 at a file offset."""
        U16.pack_into(self.mem.map, offset, value & 0xFFFF)

    @property
    def avail_idx(self) -> int:
        """avail.idx as published by the driver."""
        return self._u16(self.avail + 2)

    @property
    def avail_flags(self) -> int:
        """avail.flags."""
        return self._u16(self.avail)

    @property
    def used_event(self) -> int:
        """used_event (after the avail ring)."""
        return self._u16(self.avail + 4 + 2 * self.num)

    def set_avail_event(self, value: int) -> None:
        """Write avail_event (after the used ring)."""
        self._set_u16(self.used + 4 + 8 * self.num, value)

    def set_used_flags(self, value: int) -> None:
        """Write used.flags."""
        self._set_u16(self.used, value)

    def pop(self) -> int | None:
        """Next available head, or None."""
        if self.avail_idx == self.last_avail:
            return None
        head = self._u16(self.avail + 4 + 2 * (self.last_avail % self.num))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head

    def pop_head(self) -> int:
        """Next available head; asserts there is one."""
        head = self.pop()
        assert head is not None, "nothing available"
        return head

    def descriptor(self, head: int) -> tuple[int, int, int, int]:
        """Raw table entry (addr, len, flags, next)."""
        assert 0 <= head < self.num
        addr, length, flags, nxt = DESC.unpack_from(self.mem.map, self.desc + 16 * head)
        return addr, length, flags, nxt

    def walk(self, head: int) -> list[tuple[int, int, int]]:
        """The chain's (addr, len, flags) list, following NEXT and one INDIRECT level."""
        addr, length, flags, nxt = self.descriptor(head)
        if flags & INDIRECT:
            assert length % 16 == 0 and not flags & NEXT
            table = self.mem.gpa(addr, length)
            entries = [DESC.unpack_from(self.mem.map, table + 16 * i) for i in range(length // 16)]
            out, i = [], 0
            while True:
                a, n, f, x = entries[i]
                assert not f & INDIRECT
                out.append((a, n, f))
                if not f & NEXT:
                    assert len(out) == len(entries)
                    return out
                i = x
        out = [(addr, length, flags)]
        while flags & NEXT:
            assert len(out) <= self.num, "descriptor loop"
            addr, length, flags, nxt = self.descriptor(nxt)
            out.append((addr, length, flags))
        return out

    def read_chain(self, head: int) -> bytes:
        """Concatenated readable data of a chain."""
        return b"".join(self.mem.read(self.mem.gpa(a, n), n) for a, n, f in self.walk(head) if not f & WRITE)

    def write_chain(self, head: int, data: bytes) -> int:
        """Fill the chain's writable segments with ``data``; return bytes written."""
        done = 0
        for a, n, f in self.walk(head):
            if f & WRITE and done < len(data):
                piece = data[done:done + n]
                self.mem.write(self.mem.gpa(a, len(piece)), piece)
                done += len(piece)
        assert done == len(data), "data does not fit the chain"
        return done

    def push(self, head: int, length: int, *, publish: bool = True) -> None:
        """Write a used element; store used.idx unless ``publish`` is False."""
        ELEM.pack_into(self.mem.map, self.used + 4 + 8 * (self.used_idx % self.num), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if publish:
            self.publish_used()

    def publish_used(self) -> None:
        """Store used.idx."""
        self._set_u16(self.used + 2, self.used_idx)
