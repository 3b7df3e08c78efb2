"""GuestMemory: mapping, de-duplication, overlap refusal, bounds-checked translation, unmapping."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from ringhelper import GPA_BASE, UVA_BASE, SharedMemory

from shardswitch.vhost.wire import MemRegion
from shardswitch.virtio.memory import GuestMemory, GuestMemoryError

PAGE = 0x1000


@pytest.fixture
def shm() -> Iterator[SharedMemory]:
    """A 64 KiB memfd, the driver's view of guest memory."""
    s = SharedMemory(0x10000)
    yield s
    s.close()


def fd_is_open(fd: int) -> bool:
    """True when ``fd`` is an open descriptor."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_translation_is_shared_with_the_driver_view(shm: SharedMemory) -> None:
    """A gpa/vva view writes the memfd pages the driver sees."""
    mem = GuestMemory()
    shm.attach(mem)
    view = mem.gpa(GPA_BASE + 0x100, 4)
    view[:] = b"abcd"
    assert shm.mm[0x100:0x104] == b"abcd"
    shm.mm[0x200:0x203] = b"xyz"
    assert bytes(mem.vva(UVA_BASE + 0x200, 3)) == b"xyz"
    del view
    mem.clear()


@pytest.mark.parametrize("translate, base", [("gpa", GPA_BASE), ("vva", UVA_BASE)])
def test_bounds_at_region_edges(shm: SharedMemory, translate: str, base: int) -> None:
    """Ranges touching the first and last byte pass; one byte beyond either edge fails."""
    mem = GuestMemory()
    region = shm.attach(mem, shm.region(0, 0x8000))
    fn = getattr(mem, translate)
    size = region.memory_size
    assert len(fn(base, size)) == size
    assert len(fn(base + size - 1, 1)) == 1
    assert len(fn(base + size, 0)) == 0
    for addr, length in [(base - 1, 1), (base - 1, 2), (base + size - 1, 2), (base + size, 1),
                         (base, size + 1), (0, 1), (base, -1),
                         (2**64 - 1, 2), (base, 2**64), (base + 8, 2**64 - 8)]:
        with pytest.raises(GuestMemoryError):
            fn(addr, length)
    mem.clear()


def test_range_spanning_two_regions_is_refused(shm: SharedMemory) -> None:
    """Two regions adjacent in both address spaces still do not make one range."""
    mem = GuestMemory()
    shm.attach(mem, shm.region(0, 0x8000))
    shm.attach(mem, shm.region(0x8000, 0x8000))
    assert len(mem.gpa(GPA_BASE + 0x7FF0, 0x10)) == 0x10
    assert len(mem.gpa(GPA_BASE + 0x8000, 0x10)) == 0x10
    with pytest.raises(GuestMemoryError):
        mem.gpa(GPA_BASE + 0x7FF0, 0x20)
    with pytest.raises(GuestMemoryError):
        mem.vva(UVA_BASE + 0x7FFF, 2)
    mem.clear()


def test_second_region_at_offset_and_cache_switching(shm: SharedMemory) -> None:
    """Regions at unrelated addresses (QEMU: one memfd, mmap_offset 0 and N) translate right."""
    mem = GuestMemory()
    shm.mm[0x0:0x4] = b"low!"
    shm.mm[0xC000:0xC004] = b"high"
    shm.attach(mem, MemRegion(0x0, 0x4000, 0x7000_0000_0000, 0))
    shm.attach(mem, MemRegion(0x1_0000_0000, 0x4000, 0x7000_1000_0000, 0xC000))
    for _ in range(3):   # alternate so that the last-hit cache has to switch
        assert bytes(mem.gpa(0x0, 4)) == b"low!"
        assert bytes(mem.gpa(0x1_0000_0000, 4)) == b"high"
        assert bytes(mem.vva(0x7000_1000_0000, 4)) == b"high"
        assert bytes(mem.vva(0x7000_0000_0000, 4)) == b"low!"
    with pytest.raises(GuestMemoryError):
        mem.gpa(0x4000, 1)
    assert len(mem.regions) == 2
    mem.clear()


def test_unaligned_mmap_offset(shm: SharedMemory) -> None:
    """mmap_offset inside a page is rounded down for mmap and the view starts at it."""
    mem = GuestMemory()
    shm.mm[0x1800:0x1804] = b"here"
    shm.attach(mem, MemRegion(0x0, 0x800, UVA_BASE, 0x1800))
    assert bytes(mem.gpa(0, 4)) == b"here"
    assert len(mem.gpa(0, 0x800)) == 0x800
    with pytest.raises(GuestMemoryError):
        mem.gpa(0x7FF, 2)
    mem.clear()


def test_identical_region_is_deduplicated_and_fd_closed(shm: SharedMemory) -> None:
    """QEMU sends the same ADD_MEM_REG per queue pair: accept it once, close every fd."""
    mem = GuestMemory()
    region = shm.region()
    fds = [os.dup(shm.fd) for _ in range(3)]
    for fd in fds:
        mem.add_region(region, fd)
    assert mem.regions == [region]
    assert not any(fd_is_open(fd) for fd in fds)
    mem.clear()


@pytest.mark.parametrize("second", [
    MemRegion(GPA_BASE + 0x3000, 0x2000, UVA_BASE + 0x100000, 0),     # overlaps by gpa
    MemRegion(GPA_BASE + 0x100000, 0x2000, UVA_BASE + 0x3FFF, 0),     # overlaps by uva
    MemRegion(GPA_BASE, 0x4000, UVA_BASE, 0x1000),                     # same place, other offset
    MemRegion(GPA_BASE + 0x100000, 0, UVA_BASE + 0x100000, 0),         # empty
    MemRegion(GPA_BASE + 0x100000, 0x20000, UVA_BASE + 0x100000, 0),   # larger than the file
])
def test_bad_regions_are_refused_and_fd_closed(shm: SharedMemory, second: MemRegion) -> None:
    """Overlap (by either address), size 0 and mmap failure raise; the fd is closed anyway."""
    mem = GuestMemory()
    first = shm.attach(mem, shm.region(0, 0x4000))
    fd = os.dup(shm.fd)
    with pytest.raises(GuestMemoryError):
        mem.add_region(second, fd)
    assert not fd_is_open(fd)
    assert mem.regions == [first]
    mem.clear()


def test_remove_region_matches_without_mmap_offset(shm: SharedMemory) -> None:
    """REM_MEM_REG identifies a region by gpa, size and uva; unknown regions raise."""
    mem = GuestMemory()
    a = shm.attach(mem, shm.region(0, 0x4000))
    b = shm.attach(mem, shm.region(0x4000, 0x4000))
    mem.gpa(b.guest_phys_addr, 1)    # make b the cached last hit
    mem.remove_region(MemRegion(b.guest_phys_addr, b.memory_size, b.userspace_addr, 0))
    assert mem.regions == [a]
    with pytest.raises(GuestMemoryError):
        mem.gpa(b.guest_phys_addr, 1)
    with pytest.raises(GuestMemoryError):
        mem.remove_region(b)
    mem.clear()
    assert mem.regions == []


def test_clear_with_live_view_reports_and_still_empties(shm: SharedMemory) -> None:
    """A view alive at clear() is reported; memory stays valid until the view is dropped."""
    mem = GuestMemory()
    shm.attach(mem)
    view = mem.gpa(GPA_BASE, 8).cast("Q")
    with pytest.raises(GuestMemoryError, match="still in use"):
        mem.clear()
    assert mem.regions == []
    view[0] = 0x1122334455667788      # the mapping is still there: no crash
    assert shm.mm[0:8] == (0x1122334455667788).to_bytes(8, "little")
    del view
    shm.attach(mem)                    # a fresh region can be added afterwards
    mem.clear()


def test_remove_region_with_live_view_reports(shm: SharedMemory) -> None:
    """remove_region() also reports pinned mappings and removes the region from the table."""
    mem = GuestMemory()
    region = shm.attach(mem)
    view = mem.vva(UVA_BASE, 16)
    with pytest.raises(GuestMemoryError, match="still in use"):
        mem.remove_region(region)
    assert mem.regions == []
    del view
