"""``--trace``: a debug line for every frame to and from the guest, through the capture hook.

Theory of operation.  The data path already hands every frame, each way, to
one :class:`~shardswitch.pcap.FrameSink` (the capture hook: the TX loop
for the guest's frames, the RX writer for frames to the guest, in place or
copied).  :class:`FrameTrace` gives a sink per direction that logs
:func:`~shardswitch.net.summary.describe` of the frame; :class:`Tee` feeds a
trace sink and a capture file together when both are on.  With ``--trace``
off nothing here runs: the hook stays None and the loops test only that.
Lines go through the worker's own :class:`~shardswitch.loglimit.LogLimiter`
with :data:`TRACE_LINES` per second, so a guest sending at line rate cannot
turn the log into the bottleneck; what is left out is counted in the next
line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final

from shardswitch.loglimit import LogLimiter
from shardswitch.net.summary import describe
from shardswitch.pcap import FrameSink

#: Trace lines per second at most, each direction.
TRACE_LINES: Final = 1000
#: The words in front of each line: frames the guest sent, frames sent to it.
FROM_GUEST: Final = "guest >"
TO_GUEST: Final = "> guest"


class TraceSink:
    """Logs one line per frame going one way."""

    def __init__(self, limiter: LogLimiter, direction: str) -> None:
        """Lines go through ``limiter`` under the key ``direction``, which starts each line."""
        self.limiter = limiter
        self.direction = direction

    def add(self, frame: bytes | bytearray | memoryview) -> None:
        """One frame."""
        self.limiter.log(logging.DEBUG, self.direction, "%s %s", self.direction, describe(frame))

    def add_views(self, views: Iterable[memoryview], length: int) -> None:
        """One frame in several buffers: the headers are in the first."""
        first = next(iter(views), memoryview(b""))
        text = describe(first)
        self.limiter.log(logging.DEBUG, self.direction, "%s %s", self.direction,
                         text.rpartition(" len ")[0] + f" len {length}" if " len " in text else text)


class FrameTrace:
    """The two trace sinks of one worker."""

    def __init__(self, limiter: LogLimiter) -> None:
        """Lines go through ``limiter`` (see :data:`TRACE_LINES`)."""
        self.from_guest = TraceSink(limiter, FROM_GUEST)
        self.to_guest = TraceSink(limiter, TO_GUEST)


class Tee:
    """Two sinks fed the same frames (the trace, then the capture file)."""

    def __init__(self, first: FrameSink, second: FrameSink) -> None:
        """Feed ``first`` then ``second``."""
        self.first = first
        self.second = second

    def add(self, frame: bytes | bytearray | memoryview) -> None:
        """One frame, to both."""
        self.first.add(frame)
        self.second.add(frame)

    def add_views(self, views: Iterable[memoryview], length: int) -> None:
        """One frame in several buffers, to both (the views are gathered into a list once)."""
        parts = list(views)
        self.first.add_views(parts, length)
        self.second.add_views(parts, length)


def sinks(trace: FrameTrace | None, capture: FrameSink | None) -> tuple[FrameSink | None, FrameSink | None]:
    """The hooks for (frames from the guest, frames to the guest): the trace's, the capture, or both."""
    if trace is None:
        return capture, capture
    if capture is None:
        return trace.from_guest, trace.to_guest
    return Tee(trace.from_guest, capture), Tee(trace.to_guest, capture)
