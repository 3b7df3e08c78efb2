"""Dirty-log bitmaps for the virtio tests: a memfd to log into, and the pages found set in it."""

from __future__ import annotations

import mmap
import os
import struct


def log_file(size: int, offset: int = 0) -> int:
    """A memfd holding ``offset`` bytes of padding then a ``size``-byte zeroed bitmap."""
    fd = os.memfd_create("log")
    os.ftruncate(fd, offset + size)
    return fd


def set_pages(fd: int, size: int, offset: int = 0) -> set[int]:
    """The page numbers whose bit is set, read back through a mapping of our own."""
    with mmap.mmap(fd, offset + size) as view:
        words = struct.unpack_from(f"<{size // 8}Q", view, offset)
    return {64 * i + bit for i, word in enumerate(words) for bit in range(64) if word >> bit & 1}
