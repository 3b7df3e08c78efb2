"""Guest memory as seen by a worker: mapped regions and bounds-checked translation.

Theory of operation
-------------------
The front-end describes guest RAM as up to :data:`MAX_MEM_SLOTS` regions, each
backed by a file descriptor (a memfd for QEMU ``memory-backend-memfd``).  A
region has three addresses: its guest-physical address (``guest_phys_addr``,
what descriptors in the rings contain), the front-end's own virtual address
(``userspace_addr``, what SET_VRING_ADDR contains) and its offset inside the
fd (``mmap_offset``).  :meth:`GuestMemory.add_region` maps the fd
``MAP_SHARED`` from ``mmap_offset`` rounded down to the allocation
granularity, keeps one writable ``memoryview`` over exactly the region's bytes
and closes the fd.

Translation (:meth:`GuestMemory.gpa`, :meth:`GuestMemory.vva`) turns an
address and a length into a writable ``memoryview`` of exactly that many
bytes, provided the whole range lies inside ONE region; anything else (before,
after, straddling two regions, negative, wrapping past 2**64) raises
:class:`GuestMemoryError`.  The hot path tries the region that answered last,
then scans the (at most a handful of) regions linearly.

Lifetime contract
-----------------
A view returned by ``gpa``/``vva`` (and every slice or ``cast`` of it) keeps
the region's mapping exported: ``mmap.close()`` refuses to run while such a
view exists, which is what makes unmapping memory-safe.  So callers must drop
(or ``release()``) their views before :meth:`GuestMemory.clear` or
:meth:`GuestMemory.remove_region`: rings must be stopped
(``Virtqueue.release()``) and no chain kept across that point.  If views are
still alive, the region is nevertheless removed from the table (no new
translation can reach it) and :class:`GuestMemoryError` reports which regions
are still pinned; their mapping goes away when the last view is dropped, so a
leak is bounded and no access ever touches unmapped memory.

With the compiled ring helper (:mod:`shardswitch.virtio.ringimpl`),
:attr:`GuestMemory.fast` is the same table for compiled code
(``_vring.Regions``): every region is added to it once mapped and removed
from it before it is unmapped, so compiled code never holds a pointer into a
mapping that can go away (the table holds an export of the region's view).

Python's ``mmap`` keeps a ``dup()`` of the fd while mapped, so each region
costs one descriptor until it is unmapped.  A front-end that truncates the
memfd under us could still cause SIGBUS; ``mmap`` at least refuses a mapping
longer than the file at ``add_region`` time.
"""

from __future__ import annotations

import mmap
import os

from shardswitch.vhost.wire import MAX_MEM_SLOTS, MemRegion
from shardswitch.virtio import ringimpl


class GuestMemoryError(Exception):
    """An address/length outside guest memory, a bad region, or a failed (un)mapping."""


class _Mapping:
    """One mapped region: its addresses, its mmap and the view over its bytes."""

    __slots__ = ("region", "mm", "view", "gpa_start", "vva_start", "size")

    def __init__(self, region: MemRegion, mm: mmap.mmap | None, view: memoryview) -> None:
        """Record ``region`` mapped as ``mm`` with ``view`` covering exactly its bytes."""
        self.region = region
        self.mm = mm
        self.view = view
        self.gpa_start = region.guest_phys_addr
        self.vva_start = region.userspace_addr
        # len(view) == memory_size for real regions; -1 makes the sentinel match nothing.
        self.size = len(view) if mm is not None else -1

    def unmap(self) -> bool:
        """Release the view and close the mmap; False when other views still pin it."""
        mm = self.mm
        if mm is None:
            return True
        try:
            self.view.release()     # fails only if something exported from this very view
            mm.close()              # fails while any slice/cast of the map is alive
        except BufferError:
            return False
        return True


def _overlaps(start_a: int, size_a: int, start_b: int, size_b: int) -> bool:
    """True when the half-open ranges [start, start + size) intersect."""
    return start_a < start_b + size_b and start_b < start_a + size_a


class GuestMemory:
    """Guest memory regions mapped into this process, with bounds-checked translation."""

    def __init__(self) -> None:
        """Start with no region mapped."""
        self._maps: list[_Mapping] = []
        self._none = _Mapping(MemRegion(0, 1, 0, 0), None, memoryview(b""))
        self._last_gpa = self._none
        helper = ringimpl.compiled()
        #: The compiled helper's copy of the table (None: the Python reference runs).
        self.fast = helper.Regions() if helper is not None else None

    # ------------------------------------------------------------------ regions

    def add_region(self, region: MemRegion, fd: int) -> None:
        """Map ``fd`` for ``region`` and take ownership of the fd (always closed).

        An identical region already mapped is accepted silently (QEMU repeats
        ADD_MEM_REG for every queue pair).  A region overlapping an existing
        one by guest-physical or by front-end virtual address, a region of size
        0, too many regions, or an mmap failure raise :class:`GuestMemoryError`.
        """
        try:
            if self._check_new(region):
                return
            rounded = region.mmap_offset - region.mmap_offset % mmap.ALLOCATIONGRANULARITY
            delta = region.mmap_offset - rounded
            try:
                mm = mmap.mmap(fd, delta + region.memory_size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=rounded)
            except (OSError, ValueError, OverflowError) as exc:
                raise GuestMemoryError(f"cannot map region {_describe(region)}: {exc}") from exc
            view = memoryview(mm)[delta:delta + region.memory_size]
            self._maps.append(_Mapping(region, mm, view))
            if self.fast is not None:
                self.fast.add(region.guest_phys_addr, view)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass        # a bad fd has already made mmap fail; report that error instead

    def _check_new(self, region: MemRegion) -> bool:
        """True if ``region`` is already mapped; raise if it is empty, bad or overlaps another."""
        if region.memory_size <= 0 or min(region.guest_phys_addr, region.userspace_addr,
                                          region.mmap_offset) < 0:
            raise GuestMemoryError(f"invalid region {_describe(region)}")
        for m in self._maps:
            if m.region == region:
                return True
            old = m.region
            if _overlaps(region.guest_phys_addr, region.memory_size, old.guest_phys_addr, old.memory_size):
                raise GuestMemoryError(f"region {_describe(region)} overlaps {_describe(old)} in guest memory")
            if _overlaps(region.userspace_addr, region.memory_size, old.userspace_addr, old.memory_size):
                raise GuestMemoryError(f"region {_describe(region)} overlaps {_describe(old)} in front-end memory")
        if len(self._maps) >= MAX_MEM_SLOTS:
            raise GuestMemoryError(f"more than {MAX_MEM_SLOTS} memory regions")
        return False

    def remove_region(self, region: MemRegion) -> None:
        """Unmap the region equal to ``region`` by guest address, size and front-end address.

        Raises :class:`GuestMemoryError` when no such region is mapped, or when
        views into it are still alive (it is removed from the table anyway and
        unmapped once they are dropped).
        """
        for m in self._maps:
            old = m.region
            if (old.guest_phys_addr, old.memory_size, old.userspace_addr) == (
                    region.guest_phys_addr, region.memory_size, region.userspace_addr):
                self._maps.remove(m)
                self._forget_cache()
                if self.fast is not None:
                    self.fast.remove(m.view)
                if not m.unmap():
                    raise GuestMemoryError(f"region {_describe(old)} is still in use (views alive); "
                                           "it will be unmapped when they are dropped")
                return
        raise GuestMemoryError(f"no mapped region matches {_describe(region)}")

    def clear(self) -> None:
        """Unmap every region (rings must have been released first).

        The table is always emptied; :class:`GuestMemoryError` lists the regions
        whose mappings were still pinned by live views.
        """
        maps, self._maps = self._maps, []
        self._forget_cache()
        if self.fast is not None:
            self.fast.clear()
        pinned = [_describe(m.region) for m in maps if not m.unmap()]
        if pinned:
            raise GuestMemoryError("regions still in use (views alive), unmapped when dropped: "
                                   + ", ".join(pinned))

    def _forget_cache(self) -> None:
        """Drop the last-hit translation caches (after the table changed)."""
        self._last_gpa = self._none

    @property
    def regions(self) -> list[MemRegion]:
        """The mapped regions, in the order they were added."""
        return [m.region for m in self._maps]

    # -------------------------------------------------------------- translation

    def gpa(self, addr: int, length: int) -> memoryview:
        """Writable view of ``length`` bytes at guest-physical ``addr``, inside one region."""
        m = self._last_gpa
        off = addr - m.gpa_start
        if 0 <= off and 0 <= length <= m.size - off:
            return m.view[off:off + length]
        for m in self._maps:
            off = addr - m.gpa_start
            if 0 <= off and 0 <= length <= m.size - off:
                self._last_gpa = m
                return m.view[off:off + length]
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not inside one memory region")

    def vva(self, addr: int, length: int) -> memoryview:
        """Writable view of ``length`` bytes at front-end virtual ``addr``, inside one region.

        Only ring set-up uses front-end addresses, so there is no last-hit cache here.
        """
        for m in self._maps:
            off = addr - m.vva_start
            if 0 <= off and 0 <= length <= m.size - off:
                return m.view[off:off + length]
        raise GuestMemoryError(f"front-end range {addr:#x}+{length:#x} is not inside one memory region")


def _describe(region: MemRegion) -> str:
    """Short human-readable form of a region for error messages."""
    return (f"[gpa {region.guest_phys_addr:#x} size {region.memory_size:#x} "
            f"uva {region.userspace_addr:#x} off {region.mmap_offset:#x}]")
