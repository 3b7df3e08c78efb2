"""The dirty-page log of live migration (VHOST_F_LOG_ALL with VHOST_USER_PROTOCOL_F_LOG_SHMFD).

Theory of operation
-------------------
While QEMU migrates a guest it copies guest memory in rounds and re-sends
pages written since the previous round.  Pages the back-end writes (RX
buffers, used rings) are invisible to QEMU's own tracking, so the back-end
reports them in a bitmap QEMU shares with it (SET_LOG_BASE: a memfd, its
size and the offset of the bitmap in it)::

    bit (gpa // 4096) % 8 of byte (gpa // 4096) // 8   <-  "page gpa was written"

QEMU harvests the bitmap with an atomic exchange of each 64-bit word, and
several workers mark pages concurrently, so every mark is an atomic OR of a
64-bit word (``__atomic_fetch_or_8`` from libatomic through ctypes: Python
has no atomic memory operation of its own).  A plain read-modify-write could
lose a bit another worker set in the same word between our read and our
write, and a lost bit is a page the destination never receives.

Addresses are guest-physical (the descriptors' addresses, and the used
ring's ``log_guest_addr`` from SET_VRING_ADDR), not the front-end's virtual
addresses.  A page beyond the bitmap (the front-end sized it for guest
memory; a guest's descriptor may claim any address) is not marked, only
counted: the write itself was already refused by the guest-memory checks.

Marking costs a ctypes call per 64-bit word touched and is done only while
logging is on (during a migration); with logging off nothing here runs.
"""

from __future__ import annotations

import ctypes
import mmap
import os

#: Guest page size the bitmap counts in (VHOST_LOG_PAGE).
LOG_PAGE = 4096
PAGE_SHIFT = 12
#: Pages per bitmap word.
WORD_PAGES = 64
#: __ATOMIC_SEQ_CST.
SEQ_CST = 5


class DirtyLogError(Exception):
    """The log region cannot be used (bad size or offset, mapping failed, no libatomic)."""


def _load_fetch_or() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libatomic's 64-bit atomic OR, or None when the library is missing."""
    try:
        lib = ctypes.CDLL("libatomic.so.1")
    except OSError:
        return None
    fetch_or = lib.__atomic_fetch_or_8
    fetch_or.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    fetch_or.restype = ctypes.c_uint64
    return fetch_or


#: Loaded with this module: a sandboxed process can no longer load a library.
_FETCH_OR = _load_fetch_or()


class DirtyLog:
    """One mapping of the front-end's dirty-page bitmap; :meth:`mark` sets the bits of written ranges."""

    __slots__ = ("_map", "_base", "pages", "beyond")

    def __init__(self, fd: int, size: int, offset: int) -> None:
        """Map ``size`` bytes of bitmap at ``offset`` in ``fd`` (the caller keeps and closes ``fd``).

        Raises DirtyLogError for a size that is zero or not a whole number of
        64-bit words, an offset that is not 8-byte aligned, a file shorter than
        offset + size, or a missing libatomic.
        """
        if _FETCH_OR is None:
            raise DirtyLogError("libatomic.so.1 is missing (Debian package libatomic1)")
        if size <= 0 or size % 8 or offset < 0 or offset % 8 or size + offset > 1 << 40:
            raise DirtyLogError(f"log of {size} bytes at offset {offset}: not whole 64-bit words")
        try:
            length = os.fstat(fd).st_size
        except OSError as err:
            raise DirtyLogError(f"log descriptor: {err.strerror}") from err
        if length < offset + size:
            raise DirtyLogError(f"log file of {length} bytes is shorter than offset {offset} + size {size}")
        try:
            self._map = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            raise DirtyLogError(f"cannot map the log: {err.strerror}") from err
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map)) + offset
        #: Pages the bitmap covers.
        self.pages = size * 8
        #: Marks refused because the page lies beyond the bitmap.
        self.beyond = 0

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page of guest-physical range [gpa, gpa + length) as written."""
        if length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        if last >= self.pages or gpa < 0:
            self.beyond += 1
            return
        fetch_or = _FETCH_OR
        assert fetch_or is not None
        base = self._base
        word = first // WORD_PAGES
        while True:
            lo = first - word * WORD_PAGES
            hi = min(last - word * WORD_PAGES, WORD_PAGES - 1)
            fetch_or(base + 8 * word, ((1 << (hi - lo + 1)) - 1) << lo, SEQ_CST)
            word += 1
            first = word * WORD_PAGES
            if first > last:
                return

    def close(self) -> None:
        """Unmap the bitmap; marks made afterwards are refused (counted in :attr:`beyond`), never written."""
        self.pages = 0
        self._base = 0
        self._map.close()
