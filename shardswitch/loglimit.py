"""Log lines a peer cannot flood: repeated messages rate-limited per key, with a count of what was left out.

Theory of operation
-------------------
Some log lines are caused by what the guest or the front-end sends: a full
flow table, a socket the host refuses, a bug a frame triggers.  A guest that
does it thousands of times a second must not fill the disk or the journal,
nor slow the worker down with formatting.  :class:`LogLimiter` lets through
at most ``burst`` lines per key in each ``interval`` seconds; the lines
beyond are counted, not formatted.  The first line let through in a later
window carries the count ("... (1234 similar lines suppressed in 10 s)");
:meth:`LogLimiter.flush`, called from the worker's once-a-second tick, reports
a count that no later line would carry.  Keys are fixed strings chosen by the
caller (one per call site), so the table of keys stays small; it is bounded
anyway by :data:`MAX_KEYS`.  The clock is injectable for tests; one limiter
per process, passed explicitly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Lines per key and window, and the window length in seconds.
BURST = 5
INTERVAL = 10.0
#: Keys tracked at most (call sites are few; a key beyond this is always limited as one shared key).
MAX_KEYS = 64
_OVERFLOW_KEY = "(other)"


@dataclass(slots=True)
class _Window:
    """One key's current window: when it started, lines let through, lines suppressed."""

    start: float
    logged: int = 0
    suppressed: int = 0


class LogLimiter:
    """Rate limits for the log lines of one process."""

    def __init__(self, logger: logging.Logger, burst: int = BURST, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Limit lines sent to ``logger`` to ``burst`` per key and ``interval`` seconds."""
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        #: Lines suppressed so far, all keys together (for tests and status).
        self.suppressed_total = 0

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` used up its lines in this window; True if logged."""
        now = self.clock()
        if key not in self._windows and len(self._windows) >= MAX_KEYS:
            key = _OVERFLOW_KEY
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval:
            left_out = window.suppressed if window is not None else 0
            window = self._windows[key] = _Window(now)
            if left_out:
                msg = f"{msg} ({left_out} similar lines suppressed in {self.interval:g} s)"
        if window.logged >= self.burst:
            window.suppressed += 1
            self.suppressed_total += 1
            return False
        window.logged += 1
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """:meth:`log` at ERROR."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)

    def flush(self) -> None:
        """Report the suppressed counts of windows that have ended (once-a-second tick)."""
        now = self.clock()
        for key, window in list(self._windows.items()):
            if now - window.start >= self.interval:
                if window.suppressed:
                    self.logger.warning("%s: %d similar lines suppressed in %g s", key, window.suppressed,
                                        self.interval)
                del self._windows[key]
