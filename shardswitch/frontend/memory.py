"""Guest memory for the test front-end: one memfd, one or two regions.

Theory of operation
-------------------
A vhost-user front-end (QEMU, DPDK virtio-user, or this test driver) owns the
guest's RAM and hands it to the back-end as file descriptors plus a table of
regions (``SET_MEM_TABLE`` / ``ADD_MEM_REG``).  Each region maps a range of
guest-physical addresses (GPAs, used in descriptors) and a range of the
front-end's own virtual addresses (VVAs, used in ``SET_VRING_ADDR``) onto a
range of the file starting at ``mmap_offset``.

:class:`GuestRam` creates an anonymous memfd of ``size`` bytes, maps it once
read/write and shared, and describes it as regions the way QEMU does::

    file offset      0 ............ split-hole   split .............. size
    region 0         [gpa_base, ...)             (hole: in no region)
    region 1                                     [gpa_base+split, ...)

Without ``split`` there is a single region covering the whole file.  With
``split`` (QEMU 7.2 was observed to send regions at file offsets 0 and
0xc0000, the VGA hole 0xa0000-0xc0000 lying in between) the second region has
a non-zero ``mmap_offset``, which exercises the back-end's offset handling.
For every region, ``gpa = gpa_base + file_offset`` and
``vva = userspace_addr + file_offset``; the VVAs are fake (nothing is mapped
there in this process) but consistent, exactly what a back-end must cope with.

A bump allocator hands out GPA ranges that never straddle a region boundary
or the hole, so that any buffer the driver places is addressable through one
region.  Nothing is ever freed individually; users that recycle memory (the
driver rings) keep their own pools on top.

All checks raise :class:`GuestRamError`.
"""

from __future__ import annotations

import mmap
import os
from types import TracebackType

from shardswitch.vhost.wire import MemRegion

#: Page size every region boundary and size is a multiple of.
PAGE_SIZE = mmap.PAGESIZE
#: Default guest RAM size (64 MiB).
DEFAULT_SIZE = 64 << 20
#: Default fake front-end virtual address of file offset 0.
DEFAULT_USERSPACE_ADDR = 0x7F00_0000_0000


class GuestRamError(Exception):
    """A guest memory request was invalid (bad range, out of memory, closed)."""


def _align_up(value: int, align: int) -> int:
    """Round ``value`` up to a multiple of the power of two ``align``."""
    return (value + align - 1) & ~(align - 1)


def _check_page_multiple(name: str, value: int) -> None:
    """Raise unless ``value`` is a non-negative multiple of the page size."""
    if value < 0 or value % PAGE_SIZE:
        raise GuestRamError(f"{name} {value:#x} is not a non-negative multiple of {PAGE_SIZE:#x}")


class GuestRam:
    """memfd-backed guest RAM described as one or two vhost-user regions."""

    def __init__(self, size: int = DEFAULT_SIZE, *, gpa_base: int = 0,
                 userspace_addr: int = DEFAULT_USERSPACE_ADDR, split: int | None = None,
                 hole: int = 0, name: str = "shardswitch-guest-ram") -> None:
        """Create and map the memfd.

        ``split`` (file offset, page multiple) makes a second region start
        there; ``hole`` bytes just below ``split`` then belong to no region.
        """
        for label, value in (("size", size), ("gpa_base", gpa_base),
                             ("userspace_addr", userspace_addr), ("hole", hole)):
            _check_page_multiple(label, value)
        if size == 0:
            raise GuestRamError("guest RAM size must be positive")
        if split is None:
            if hole:
                raise GuestRamError("a hole needs a split")
            self._regions = [MemRegion(gpa_base, size, userspace_addr, 0)]
        else:
            _check_page_multiple("split", split)
            if not (0 < split - hole and split < size):
                raise GuestRamError(f"split {split:#x} with hole {hole:#x} does not fit in {size:#x}")
            self._regions = [
                MemRegion(gpa_base, split - hole, userspace_addr, 0),
                MemRegion(gpa_base + split, size - split, userspace_addr + split, split),
            ]
        self.size = size
        self.gpa_base = gpa_base
        self.userspace_addr = userspace_addr
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._map: mmap.mmap | None = mmap.mmap(self._fd, size, mmap.MAP_SHARED,
                                                    mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self._mv: memoryview | None = memoryview(self._map)
        self._next_gpa = gpa_base

    # -- description -----------------------------------------------------

    @property
    def regions(self) -> list[MemRegion]:
        """The regions to send in SET_MEM_TABLE / ADD_MEM_REG (one fd each)."""
        return list(self._regions)

    def gpa_of(self, vva: int) -> int:
        """The guest-physical address of front-end virtual address ``vva`` (ValueError outside memory)."""
        for region in self._regions:
            if region.userspace_addr <= vva < region.userspace_addr + region.memory_size:
                return region.guest_phys_addr + vva - region.userspace_addr
        raise ValueError(f"{vva:#x} is outside guest memory")

    @property
    def fd(self) -> int:
        """The memfd (owned by this object; dup it to keep it past close())."""
        if self._fd < 0:
            raise GuestRamError("guest RAM is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self._fd < 0

    # -- allocation ------------------------------------------------------

    def alloc(self, size: int, align: int = 64) -> int:
        """Reserve ``size`` bytes aligned to ``align`` (power of two); return the GPA.

        The range lies inside one region.  Raises :class:`GuestRamError` when
        no region has room left.
        """
        if size <= 0:
            raise GuestRamError(f"allocation size {size} must be positive")
        if align <= 0 or align & (align - 1):
            raise GuestRamError(f"alignment {align} is not a power of two")
        for region in self._regions:
            start = _align_up(max(self._next_gpa, region.guest_phys_addr), align)
            if start + size <= region.guest_phys_addr + region.memory_size:
                self._next_gpa = start + size
                return start
        raise GuestRamError(f"out of guest memory allocating {size} bytes")

    @property
    def allocated(self) -> int:
        """Bytes of GPA space consumed so far by the bump allocator (incl. padding and hole)."""
        return self._next_gpa - self.gpa_base

    # -- translation -----------------------------------------------------

    def _region_of(self, gpa: int, length: int) -> MemRegion:
        """The region holding [gpa, gpa+length), or raise."""
        if length < 0:
            raise GuestRamError(f"negative length {length}")
        for region in self._regions:
            start = region.guest_phys_addr
            if start <= gpa and gpa + length <= start + region.memory_size:
                return region
        raise GuestRamError(f"guest range {gpa:#x}+{length:#x} is not inside one region")

    def offset(self, gpa: int, length: int = 0) -> int:
        """File offset of ``gpa``, checking [gpa, gpa+length) lies in one region."""
        region = self._region_of(gpa, length)
        return region.mmap_offset + gpa - region.guest_phys_addr

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of [gpa, gpa+length) (must lie inside one region).

        Release views (``view.release()`` or dropping them) before close().
        """
        if self._mv is None:
            raise GuestRamError("guest RAM is closed")
        start = self.offset(gpa, length)
        return self._mv[start:start + length]

    def read(self, gpa: int, length: int) -> bytes:
        """Copy [gpa, gpa+length) out of guest memory."""
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
        self.view(gpa, len(data))[:] = data

    def gpa_to_vva(self, gpa: int) -> int:
        """The front-end virtual address (as sent in SET_VRING_ADDR) of ``gpa``."""
        region = self._region_of(gpa, 0)
        return region.userspace_addr + gpa - region.guest_phys_addr

    def vva_to_gpa(self, vva: int) -> int:
        """The guest-physical address of front-end virtual address ``vva``."""
        for region in self._regions:
            if region.userspace_addr <= vva < region.userspace_addr + region.memory_size:
                return region.guest_phys_addr + vva - region.userspace_addr
        raise GuestRamError(f"virtual address {vva:#x} is not inside a region")

    # -- life cycle ------------------------------------------------------

    def close(self) -> None:
        """Unmap and close the memfd; idempotent.

        If views handed out by :meth:`view` are still alive the mapping cannot
        be unmapped now; it is then left to the garbage collector (the fd is
        closed regardless; the back-end keeps its own duplicates).
        """
        if self._mv is not None:
            try:
                self._mv.release()
            except BufferError:
                pass
            self._mv = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GuestRam:
        """Context manager entry: return self."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Context manager exit: close()."""
        self.close()
