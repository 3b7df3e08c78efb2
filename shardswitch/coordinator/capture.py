"""The coordinator's side of packet capture: which files, the workers told, the size kept in bounds.

The capture itself is the workers' (:mod:`shardswitch.pcap`: each appends the
frames it moves).  Here: starting (``--pcap`` at start, ``shardswitch capture
start`` at run time: two descriptors, ``FILE`` and ``FILE.1``, opened by whoever
has the right to), stopping, rotating once the current file passes its limit,
and giving a replaced worker the current file.  Every worker gets its own
duplicate of the descriptor (SCM_RIGHTS), so the files stay open as long as
one writer needs them.  Starting, rotating and stopping wait until every
worker took the change in (a status query behind it on the same ordered
channel), so the file holds exactly the frames moved between the two.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any, Callable, Protocol

from shardswitch.ipc import Capture
from shardswitch.pcap import MIN_SIZE, CaptureFiles, global_header

log = logging.getLogger("shardswitch")


class WorkerSender(Protocol):
    """What capture needs from the worker pool."""

    count: int

    def send(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = ()) -> bool:
        """Send without waiting."""


class CaptureError(Exception):
    """A capture cannot start (bad descriptors or size)."""


class CaptureControl:
    """Capture state of one coordinator."""

    def __init__(self, pool: WorkerSender, barrier: Callable[[int], object]) -> None:
        """No capture yet; ``barrier(pair)`` returns once the worker of ``pair`` handled what it was sent
        before (a status query: the channel keeps order), so that a capture starts and stops at a known
        point."""
        self.pool = pool
        self.barrier = barrier
        self.files: CaptureFiles | None = None

    def start(self, fds: list[int], limit: int, name: str) -> None:
        """Capture into ``fds`` (``FILE`` then ``FILE.1``, owned from here on) with ``limit`` bytes per file
        (0: none); a capture running is stopped first.  CaptureError when the descriptors are not two
        writable regular files or the limit is too small."""
        try:
            if len(fds) != 2:
                raise CaptureError(f"a capture needs 2 files (FILE and FILE.1), got {len(fds)} descriptors")
            for fd in fds:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise CaptureError(f"descriptor {fd} is not a regular file")
            if limit and limit < MIN_SIZE:
                raise CaptureError(f"size limit {limit} is below {MIN_SIZE} bytes")
            if os.fstat(fds[0]).st_size == 0:
                os.write(fds[0], global_header())
        except (CaptureError, OSError) as err:
            for fd in fds:
                os.close(fd)
            raise CaptureError(str(err)) from None
        self.stop()
        self.files = CaptureFiles((fds[0], fds[1]), limit, name)
        self._broadcast()
        log.info("capturing every frame into %s%s", name, f" (at most {limit} bytes per file, then "
                 f"{name}.1)" if limit else "")

    def stop(self) -> bool:
        """Stop the capture (the workers flush and close their copies); whether one was running."""
        if self.files is None:
            return False
        for pair in range(self.pool.count):
            self.pool.send(pair, Capture())
        for pair in range(self.pool.count):
            self.barrier(pair)
        log.info("capture into %s stopped after %d rotation(s)", self.files.name, self.files.rotations)
        self.files.close()
        self.files = None
        return True

    def tick(self, now: float) -> float | None:
        """Rotate when the current file is past its limit; seconds until the next look (None: no capture)."""
        if self.files is None:
            return None
        due, wait = self.files.due(now)
        if due:
            try:
                self.files.rotate()
            except OSError as err:
                log.error("capture rotation failed (%s): the capture goes on in the same file", err.strerror)
                return wait
            self._broadcast()
            log.info("capture file full: going on in %s%s", self.files.name,
                     ".1" if self.files.current else "")
        return wait

    def restore(self, pair: int) -> None:
        """A replaced worker captures too."""
        if self.files is not None:
            self.pool.send(pair, Capture(), [self.files.fd])

    def _broadcast(self) -> None:
        """Every worker to the current file."""
        assert self.files is not None
        for pair in range(self.pool.count):
            self.pool.send(pair, Capture(), [self.files.fd])
        for pair in range(self.pool.count):
            self.barrier(pair)

    def status(self) -> dict[str, Any]:
        """For ``shardswitch status``."""
        if self.files is None:
            return {"active": False}
        return {"active": True, "file": self.files.name + (".1" if self.files.current else ""),
                "limit": self.files.limit, "rotations": self.files.rotations}
