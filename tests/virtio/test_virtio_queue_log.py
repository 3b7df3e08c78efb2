"""Dirty logging in the virtqueue: the pages a queue writes while logging is on, and only those."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dirtylogkit import log_file, set_pages
from ringhelper import DESC, INDIRECT, NEXT, WRITE, DriverRing, SharedMemory

from shardswitch.virtio.dirtylog import LOG_PAGE, DirtyLog
from shardswitch.virtio.memory import GuestMemory
from shardswitch.virtio.virtqueue import Chain, Virtqueue

#: Bitmap bytes: enough pages for the test memfd's guest-physical range (GPA_BASE + 1 MiB).
LOG_BYTES = 8 * 8192


@pytest.fixture
def log() -> Iterator[tuple[DirtyLog, int]]:
    """A dirty log over a fresh memfd, and that memfd."""
    fd = log_file(LOG_BYTES)
    dirty = DirtyLog(fd, LOG_BYTES, 0)
    yield dirty, fd
    dirty.close()


def pages(gpa: int, length: int) -> set[int]:
    """Page numbers of a guest-physical range."""
    return set(range(gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE + 1)) if length > 0 else set()


def used_pages(ring: DriverRing) -> set[int]:
    """The pages of the ring's used ring."""
    return pages(ring.gpa(ring.layout.used), 6 + 8 * ring.num)


@pytest.fixture
def logq(shm: SharedMemory, mem: GuestMemory, log: tuple[DirtyLog, int]) -> Iterator[tuple[DriverRing, Virtqueue, int]]:
    """A ring of 8 and its device queue, logging from the start; and the log's memfd."""
    dirty, fd = log
    ring = DriverRing(shm, 8)
    vq = ring.device(mem)
    vq.start_logging(dirty, ring.gpa(ring.layout.used))
    yield ring, vq, fd
    vq.release()


def pop_one(ring: DriverRing, vq: Virtqueue, bufs: list[tuple[int, bool]]) -> tuple[int, Chain]:
    """Post a chain of ``bufs`` and pop it; (head, chain)."""
    head = ring.chain(bufs)
    ring.post(head)
    chain = vq.pop()
    assert chain is not None and chain[0] == head
    return head, chain


def desc(ring: DriverRing, index: int, table: int | None = None) -> tuple[int, int]:
    """(gpa, len) of ring descriptor ``index`` (or of an indirect table's)."""
    addr, length, _flags, _next = DESC.unpack_from(ring.mm, (ring.layout.desc if table is None else table)
                                                   + 16 * index)
    return addr, length


def test_written_bytes_and_used_ring_marked(logq: tuple[DriverRing, Virtqueue, int]) -> None:
    """A chain of a readable and two writable 6 KiB buffers of which 7 KiB were written: the pages of those
    7 KiB (the first writable buffer whole, the start of the second) and the used ring; nothing readable."""
    ring, vq, fd = logq
    head, _chain = pop_one(ring, vq, [(6000, False), (6144, True), (6144, True)])
    ids = [head]
    while len(ids) < 3:
        ids.append(DESC.unpack_from(ring.mm, ring.layout.desc + 16 * ids[-1])[3])
    first, second = desc(ring, ids[1]), desc(ring, ids[2])
    vq.push(head, 7168)
    assert vq.flush()
    expected = pages(first[0], first[1]) | pages(second[0], 7168 - first[1]) | used_pages(ring)
    assert set_pages(fd, LOG_BYTES) == expected
    assert not pages(*desc(ring, ids[0])) - used_pages(ring) - expected & set_pages(fd, LOG_BYTES)


def test_single_descriptor_and_indirect_chains_marked(logq: tuple[DriverRing, Virtqueue, int]) -> None:
    """The fast path (one descriptor) and an indirect table's writable entries are logged too."""
    ring, vq, fd = logq
    single = ring.chain([(9000, True)])
    ring.post(single)
    table, length = ring.indirect_table([(100, False), (5000, True)])
    ring.write_desc(7, ring.gpa(table), length, INDIRECT)
    ring.post(7)
    popped = [vq.pop(), vq.pop()]
    vq.push(single, 9000)
    vq.push(7, 5000)
    vq.flush()
    expected = pages(*desc(ring, single)) | pages(*desc(ring, 1, table)) | used_pages(ring)
    assert set_pages(fd, LOG_BYTES) == expected
    del popped


def test_nothing_logged_when_off_and_after_stop(shm: SharedMemory, mem: GuestMemory,
                                                log: tuple[DirtyLog, int]) -> None:
    """Without logging, or after stop_logging, no bit is set; kick requests mark the used ring while on."""
    dirty, fd = log
    ring = DriverRing(shm, 8)
    vq = ring.device(mem)
    head = ring.chain([(4096, True)])
    ring.post(head)
    assert vq.pop() is not None
    vq.push(head, 4096)
    vq.flush()
    assert set_pages(fd, LOG_BYTES) == set()
    vq.start_logging(dirty, ring.gpa(ring.layout.used))
    assert set_pages(fd, LOG_BYTES) == used_pages(ring)      # marked at once: the state it has now
    vq.stop_logging()
    head, chain = pop_one(ring, vq, [(4096, True)])
    vq.push(head, 4096)
    vq.flush()
    vq.enable_kicks()
    assert set_pages(fd, LOG_BYTES) == used_pages(ring)
    del chain
    vq.release()


def test_a_guest_that_rewrites_a_descriptor_cannot_unmark_its_buffer(
        logq: tuple[DriverRing, Virtqueue, int]) -> None:
    """The addresses logged are those read at pop, the ones written to, whatever the guest changes later."""
    ring, vq, fd = logq
    head, _chain = pop_one(ring, vq, [(4096, True)])
    original = desc(ring, head)
    ring.write_desc(head, ring.gpa(0), 16, WRITE | NEXT, 5)     # rewritten after the pop
    vq.push(head, 4096)
    vq.flush()
    assert pages(*original) <= set_pages(fd, LOG_BYTES)
