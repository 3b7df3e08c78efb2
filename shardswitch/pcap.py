"""Packet capture: every frame to and from the guest, all queue pairs, in one pcap file.

Theory of operation
-------------------
The file is classic pcap (what tcpdump and Wireshark read): a global header
(:data:`GLOBAL_HEADER`: microsecond timestamps, Ethernet link type, snap
length :data:`SNAPLEN`), then one record per frame (:data:`RECORD`: time,
captured and original length, the frame without its virtio-net header).

Every worker writes into the same file.  A worker collects the records of
what it moves in a private buffer (:class:`PcapWriter`, no lock, no system
call per frame) and appends the buffer with one ``write()`` once per loop
round or when it passes :data:`FLUSH_AT` bytes.  The file is opened with
O_APPEND, and the kernel appends each write to a regular file whole, under
the inode's lock: records of different workers never tear or overwrite each
other; they are ordered by write, and each carries its own timestamp, so a
reader sorts them if it cares (``mergecap``, Wireshark).

**Size and rotation** (:class:`CaptureFiles`, the coordinator's).  Two files
are opened up front, ``FILE`` and ``FILE.1``, before the sandbox (or by the
``shardswitch capture start`` client, which passes them over the control
socket): the sandboxed processes never open a path.  Once a second the
coordinator looks at the current file; past the size limit it empties the
other one, writes its header and hands it to the workers, which flush to the
old one and go on in the new one: nothing is lost, and the two files hold the
last one to two limits of traffic, the newer being the one written last
(``ls -t``; ``mergecap -w all.pcap FILE FILE.1`` joins them in time order).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable
from typing import Protocol

from shardswitch.settings import PCAP_MIN_SIZE

#: pcap global header: magic, version 2.4, timezone, sigfigs, snap length, link type.
GLOBAL_HEADER = struct.Struct("<IHHiIII")
#: pcap record header: seconds, microseconds, captured length, original length.
RECORD = struct.Struct("<IIII")
assert GLOBAL_HEADER.size == 24 and RECORD.size == 16
MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
#: Largest frame kept whole (a 64 KiB GSO frame with its headers fits).
SNAPLEN = 262144
#: A worker's buffer is written once it holds this much.
FLUSH_AT = 1 << 20
#: How often the coordinator looks at the size (seconds).
CHECK_INTERVAL = 1.0
#: Smallest size limit (a few frames of the largest size).
MIN_SIZE = PCAP_MIN_SIZE


def global_header() -> bytes:
    """The header a capture file starts with."""
    return GLOBAL_HEADER.pack(MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)


class FrameSink(Protocol):
    """What sees every frame to or from the guest: a capture file, ``--trace``, or both (:mod:`shardswitch.worker.trace`)."""

    def add(self, frame: bytes | bytearray | memoryview) -> None:
        """One frame."""

    def add_views(self, views: Iterable[memoryview], length: int) -> None:
        """One frame of ``length`` bytes held in several buffers."""


class PcapWriter:
    """A worker's side: records buffered, appended to the file in whole writes."""

    def __init__(self, fd: int) -> None:
        """Write into ``fd`` (owned: closed by :meth:`close`)."""
        self.fd = fd
        self.buf = bytearray()
        self.frames = 0
        #: Records lost because the file refused a write (a full disk...).
        self.lost = 0

    def add(self, frame: bytes | bytearray | memoryview) -> None:
        """One frame, timestamped now."""
        now = time.time()
        length = len(frame)
        kept = min(length, SNAPLEN)
        self.buf += RECORD.pack(int(now), int(now % 1 * 1e6), kept, length)
        self.buf += frame if kept == length else memoryview(frame)[:kept]
        self.frames += 1
        if len(self.buf) >= FLUSH_AT:
            self.flush()

    def add_views(self, views: Iterable[memoryview], length: int) -> None:
        """One frame of ``length`` bytes held in several buffers (an RX frame written in place)."""
        now = time.time()
        kept = min(length, SNAPLEN)
        self.buf += RECORD.pack(int(now), int(now % 1 * 1e6), kept, length)
        left = kept
        for view in views:
            if left <= 0:
                break
            self.buf += view[:left]
            left -= len(view)
        self.frames += 1
        if len(self.buf) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Append what is buffered, in one write when the kernel takes it whole."""
        if not self.buf:
            return
        view = memoryview(self.buf)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            self.lost += 1
        finally:
            view.release()
            self.buf.clear()

    def close(self) -> None:
        """Flush and close the file."""
        self.flush()
        os.close(self.fd)


def open_pair(path: str) -> tuple[int, int]:
    """``path`` and ``path.1`` opened for appending (created mode 0640, emptied), the first with its header:
    what a capture needs before the sandbox; OSError when they cannot be."""
    fds = []
    try:
        for name in (path, path + ".1"):
            fds.append(os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o640))
        os.write(fds[0], global_header())
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], fds[1]


class CaptureFiles:
    """The coordinator's side: the two files, which one is current, the size limit (0: none)."""

    def __init__(self, fds: tuple[int, int], limit: int, name: str) -> None:
        """Own ``fds`` (the first current, with its header); ``name``: what the log calls the capture."""
        self.fds = fds
        self.current = 0
        self.limit = limit
        self.name = name
        self.rotations = 0
        self.next_check = 0.0

    @property
    def fd(self) -> int:
        """The file the workers write into."""
        return self.fds[self.current]

    def due(self, now: float) -> tuple[bool, float]:
        """Whether the current file must rotate now, and the seconds until the next look."""
        if not self.limit:
            return False, CHECK_INTERVAL
        if now < self.next_check:
            return False, self.next_check - now
        self.next_check = now + CHECK_INTERVAL
        try:
            return os.fstat(self.fd).st_size > self.limit, CHECK_INTERVAL
        except OSError:
            return False, CHECK_INTERVAL

    def rotate(self) -> int:
        """Empty the other file, give it its header and make it current; its descriptor (for the workers)."""
        other = 1 - self.current
        os.ftruncate(self.fds[other], 0)
        os.write(self.fds[other], global_header())
        self.current = other
        self.rotations += 1
        return self.fds[other]

    def close(self) -> None:
        """Close both files."""
        for fd in self.fds:
            os.close(fd)
