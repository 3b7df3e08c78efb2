"""The dirty-page bitmap (shardswitch.virtio.dirtylog): which bits a write sets, bounds, concurrency."""

from __future__ import annotations

import os

import pytest
from dirtylogkit import log_file, set_pages

from shardswitch.virtio.dirtylog import LOG_PAGE, DirtyLog, DirtyLogError


@pytest.mark.parametrize("gpa, length, pages", [
    (0, 1, {0}),
    (LOG_PAGE - 1, 2, {0, 1}),
    (5 * LOG_PAGE, LOG_PAGE, {5}),
    (63 * LOG_PAGE + 100, LOG_PAGE, {63, 64}),           # across a word boundary
    (10 * LOG_PAGE, 200 * LOG_PAGE, set(range(10, 210))),  # several whole words
    (3 * LOG_PAGE, 0, set()),
])
def test_mark_sets_the_pages_written(gpa: int, length: int, pages: set[int]) -> None:
    """Every page the range touches, and only those."""
    fd = log_file(64, offset=24)
    try:
        log = DirtyLog(fd, 64, 24)
        log.mark(gpa, length)
        log.close()
        assert set_pages(fd, 64, 24) == pages
    finally:
        os.close(fd)


def test_marks_accumulate_and_beyond_is_counted() -> None:
    """Marks OR into what is there (QEMU harvests and clears); a range past the bitmap marks nothing."""
    fd = log_file(8)
    try:
        log = DirtyLog(fd, 8, 0)
        log.mark(0, 1)
        log.mark(2 * LOG_PAGE, 1)
        log.mark(63 * LOG_PAGE, LOG_PAGE + 1)              # runs past page 63: refused whole
        log.mark(1 << 50, 4096)
        assert log.beyond == 2
        assert set_pages(fd, 8) == {0, 2}
        log.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("size, offset, file_size, message", [
    (0, 0, 64, "whole 64-bit words"),
    (12, 0, 64, "whole 64-bit words"),
    (8, 4, 64, "whole 64-bit words"),
    (64, 8, 64, "shorter than"),
])
def test_bad_regions_refused(size: int, offset: int, file_size: int, message: str) -> None:
    """Sizes and offsets that are not whole words, and a file too short, are refused with the reason."""
    fd = os.memfd_create("log")
    os.ftruncate(fd, file_size)
    try:
        with pytest.raises(DirtyLogError, match=message):
            DirtyLog(fd, size, offset)
    finally:
        os.close(fd)


def test_concurrent_marks_from_two_processes_lose_nothing() -> None:
    """Two processes marking interleaved pages of the same words at once, each bit exactly once: every bit is
    set.  A plain read-modify-write would lose some (each process rewrites words the other just changed)."""
    words = 4096
    fd = log_file(8 * words)
    try:
        ready_r, ready_w = os.pipe()
        children = []
        for parity in (0, 1):
            pid = os.fork()
            if pid == 0:
                log = DirtyLog(fd, 8 * words, 0)
                os.read(ready_r, 1)                      # start together
                for page in range(parity, 64 * words, 2):
                    log.mark(page * LOG_PAGE, 1)
                os._exit(0)
            children.append(pid)
        os.write(ready_w, b"go")
        for pid in children:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        os.close(ready_r)
        os.close(ready_w)
        assert len(set_pages(fd, 8 * words)) == 64 * words
    finally:
        os.close(fd)


def test_marks_after_close_are_refused_not_written() -> None:
    """A closed log (the worker took a new one, or the device was reset) unmaps its bitmap; a late mark is
    counted, never written to the old address."""
    fd = log_file(8)
    try:
        log = DirtyLog(fd, 8, 0)
        log.close()
        log.mark(0, 1)
        assert log.beyond == 1 and set_pages(fd, 8) == set()
    finally:
        os.close(fd)
