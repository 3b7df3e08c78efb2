"""GuestRam: regions, allocation, translation and life cycle."""

from __future__ import annotations

import os
from typing import Any

import pytest

from shardswitch.frontend.memory import DEFAULT_USERSPACE_ADDR, PAGE_SIZE, GuestRam, GuestRamError
from shardswitch.vhost.wire import MemRegion

MIB = 1 << 20


def test_single_region_defaults() -> None:
    """One region covering the whole memfd, at gpa 0 and the default virtual base."""
    with GuestRam(4 * MIB) as ram:
        assert ram.regions == [MemRegion(0, 4 * MIB, DEFAULT_USERSPACE_ADDR, 0)]
        assert os.fstat(ram.fd).st_size == 4 * MIB
        assert ram.gpa_to_vva(0x1234) == DEFAULT_USERSPACE_ADDR + 0x1234
        assert ram.vva_to_gpa(DEFAULT_USERSPACE_ADDR + 0x1234) == 0x1234


def test_view_writes_reach_the_memfd() -> None:
    """What is written through a view is what another mapping of the fd reads."""
    with GuestRam(MIB, gpa_base=0x10_0000) as ram:
        gpa = ram.alloc(100)
        view = ram.view(gpa, 5)
        view[:] = b"hello"
        view.release()
        assert os.pread(ram.fd, 5, gpa - 0x10_0000) == b"hello"
        ram.write(gpa + 5, b"!")
        assert ram.read(gpa, 6) == b"hello!"


def test_alloc_alignment_and_exhaustion() -> None:
    """Allocations are aligned, disjoint, and fail cleanly when memory runs out."""
    with GuestRam(2 * PAGE_SIZE) as ram:
        a = ram.alloc(3, 1)
        b = ram.alloc(10, 16)
        c = ram.alloc(4, 4096)
        assert a == 0 and b == 16 and c == 4096
        with pytest.raises(GuestRamError):
            ram.alloc(PAGE_SIZE)
        with pytest.raises(GuestRamError):
            ram.alloc(8, 3)
        with pytest.raises(GuestRamError):
            ram.alloc(0)


def test_out_of_range_access_is_rejected() -> None:
    """Ranges outside the regions raise GuestRamError."""
    with GuestRam(MIB) as ram:
        with pytest.raises(GuestRamError):
            ram.view(MIB - 4, 8)
        with pytest.raises(GuestRamError):
            ram.view(0, -1)
        with pytest.raises(GuestRamError):
            ram.gpa_to_vva(MIB + 1)
        with pytest.raises(GuestRamError):
            ram.vva_to_gpa(0x1000)


def test_split_with_hole_like_qemu() -> None:
    """Two regions from one memfd, the second at a non-zero mmap_offset, a hole in between."""
    with GuestRam(4 * MIB, split=0xC0000, hole=0x20000) as ram:
        assert ram.regions == [
            MemRegion(0, 0xA0000, DEFAULT_USERSPACE_ADDR, 0),
            MemRegion(0xC0000, 4 * MIB - 0xC0000, DEFAULT_USERSPACE_ADDR + 0xC0000, 0xC0000),
        ]
        with pytest.raises(GuestRamError):
            ram.view(0xB0000, 1)                    # in the hole
        with pytest.raises(GuestRamError):
            ram.view(0x9F000, 0x2000)               # runs off region 0
        first = ram.alloc(0x9F000, 4096)
        second = ram.alloc(0x2000, 64)               # does not fit in region 0 any more
        assert first == 0 and second == 0xC0000
        ram.write(second, b"xyz")
        assert os.pread(ram.fd, 3, 0xC0000) == b"xyz"
        assert ram.gpa_to_vva(second + 1) == DEFAULT_USERSPACE_ADDR + 0xC0001


def test_split_without_hole_never_straddles() -> None:
    """Allocations never cross the region boundary even when the GPAs are contiguous."""
    with GuestRam(2 * MIB, split=MIB) as ram:
        ram.alloc(MIB - 16)
        assert ram.alloc(64) == MIB


@pytest.mark.parametrize("kwargs", [
    {"size": 1000},
    {"size": MIB, "hole": PAGE_SIZE},
    {"size": MIB, "split": 2 * MIB},
    {"size": MIB, "split": PAGE_SIZE, "hole": PAGE_SIZE},
    {"size": MIB, "gpa_base": 123},
    {"size": 0},
])
def test_invalid_layouts(kwargs: dict[str, Any]) -> None:
    """Layouts that cannot be described as page-aligned regions are refused."""
    with pytest.raises(GuestRamError):
        GuestRam(**kwargs)


def test_close_is_idempotent_even_with_live_views() -> None:
    """close() closes the fd even if a view is still alive, and can be repeated."""
    ram = GuestRam(MIB)
    fd = ram.fd
    view = ram.view(0, 16)
    ram.close()
    ram.close()
    assert ram.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(GuestRamError):
        ram.view(0, 1)
    view.release()
