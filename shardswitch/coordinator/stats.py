"""``--stats DELAY``: a log line of what the workers moved, at most every DELAY seconds, as passt's.

Theory of operation.  passt's ``--stats`` prints its event counters with at
least DELAY seconds between updates, and nothing while nothing happens.
:class:`StatsLog` is that schedule and that line, sans-IO: the coordinator's
loop asks :meth:`StatsLog.wait` how long it may sleep, and once it is due
gathers a status (the same answer ``shardswitch status`` gives) and hands it
to :meth:`StatsLog.line`, which sums the workers' counters and returns the
line, or None when nothing moved since the last one.  The figures are totals
since start, each followed by the change since the last line.
"""

from __future__ import annotations

from typing import Any

#: The counters summed over the workers, and their names in the line.
FIELDS = (("tx_frames", "frames from the guest"), ("rx_frames", "to the guest"), ("tx_bytes", "bytes from"),
          ("rx_bytes", "to"), ("flows", "flows"))


class StatsLog:
    """When the next stats line is due, and what it says."""

    def __init__(self, delay: float, now: float) -> None:
        """A line at most every ``delay`` seconds (> 0), the first ``delay`` after ``now``."""
        self.delay = delay
        self.next = now + delay
        self.last: dict[str, int] = {}

    def wait(self, now: float) -> float:
        """Seconds until the next line is due (0: now)."""
        return max(0.0, self.next - now)

    def line(self, status: dict[str, Any], now: float) -> str | None:
        """The line for ``status`` (a coordinator status answer), or None when nothing moved; the next one is
        due ``delay`` seconds after ``now``."""
        self.next = now + self.delay
        totals = {key: 0 for key, _name in FIELDS}
        drops = 0
        for worker in status.get("workers", []):
            for key in totals:
                value = worker.get(key, 0)
                totals[key] += value if isinstance(value, int) else 0
            drops += sum(v for v in worker.get("drops", {}).values() if isinstance(v, int))
        totals["drops"] = drops
        if totals == self.last:
            return None
        before, self.last = self.last, totals
        parts = [f"{name} {totals[key]} ({totals[key] - before.get(key, 0):+d})"
                 for key, name in FIELDS + (("drops", "dropped"),)]
        return "stats: " + ", ".join(parts)
