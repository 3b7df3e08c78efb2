"""``--log-file FILE``: a log file of bounded size, written by the coordinator and every worker.

Theory of operation
-------------------
The file is opened once, in append mode, before the sandbox hides the
filesystem; the workers inherit the descriptor when forked.  Every record is
one ``write()`` of whole lines (a line-buffered stream), and O_APPEND puts
each at the end of the file whoever writes it, so lines of different processes
never overwrite each other.

Only the coordinator keeps the size under ``--log-size``: once a second
(:meth:`LogFile.trim`) it looks at the size and, above the limit, keeps the
newest quarter (from a line start) behind a line saying so, as passt's log
rotation does.  Between two looks the file can grow by what one second of
logging writes, which the rate limits of :mod:`shardswitch.loglimit` bound.
A line a worker appends while the coordinator trims may be lost: trimming is
rare and said in the file.
"""

from __future__ import annotations

import io
import logging
import os
import time

#: What a trim keeps: this fraction of the limit, the newest lines.
KEEP_FRACTION = 4
#: How often the coordinator looks at the size (seconds).
TRIM_INTERVAL = 1.0


class LogFile:
    """One log file opened for appending, with its size limit."""

    def __init__(self, path: str, limit: int) -> None:
        """Open (create, mode 0640) ``path`` for appending (and reading, to trim); OSError when it cannot be
        opened."""
        self.path = path
        self.limit = limit
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.stream = io.TextIOWrapper(io.FileIO(self.fd, "a", closefd=True), encoding="utf-8",
                                       errors="backslashreplace", line_buffering=True, write_through=True)
        self.next_trim = 0.0
        self.trims = 0

    def handler(self, formatter: logging.Formatter) -> logging.Handler:
        """A logging handler writing into the file with ``formatter``."""
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(formatter)
        return handler

    def trim(self, now: float | None = None) -> float:
        """Keep the file under its limit (see the module's docstring); the seconds until the next look."""
        now = time.monotonic() if now is None else now
        if now < self.next_trim:
            return self.next_trim - now
        self.next_trim = now + TRIM_INTERVAL
        try:
            size = os.fstat(self.fd).st_size
            if size > self.limit:
                self._cut(size)
        except OSError:
            pass                           # a full disk or a removed file: logging goes on as it can
        return TRIM_INTERVAL

    def _cut(self, size: int) -> None:
        """Keep the newest part of the file, from a line start."""
        keep = self.limit // KEEP_FRACTION
        tail = os.pread(self.fd, keep, size - keep)
        start = tail.find(b"\n") + 1
        tail = tail[start:]
        self.trims += 1
        marker = (f"--- log file over {self.limit} bytes: {size - len(tail)} older bytes dropped "
                  f"(trim {self.trims}) ---\n").encode()
        os.ftruncate(self.fd, 0)
        os.write(self.fd, marker + tail)

    def close(self) -> None:
        """Close the file."""
        self.stream.close()
