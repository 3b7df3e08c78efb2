"""What a worker's deferred handler tells the flow table about its own flows.

Each protocol keeps its flows' last activity locally (no shared write per
packet).  Once a second, :func:`sync_table` removes the flows that expired
in one batch (one write lock) and publishes the activity times that changed
(one unlocked store each: only the owner writes its entries' times), so that
``shardswitch flows`` shows ages at most a second stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from shardswitch.shm.layout import FlowRef
from shardswitch.shm.table import FlowTable


class TimedFlow(Protocol):
    """A flow as the deferred handler sees it."""

    ref: FlowRef
    #: Last activity (monotonic seconds), and the value last written to the table.
    last: float
    published: float


def sync_table(table: FlowTable | None, live: Iterable[TimedFlow], expired: Sequence[TimedFlow]) -> None:
    """Remove ``expired`` from the table in one batch; publish the changed activity times of ``live``."""
    if table is None:
        return
    if expired:
        table.remove_many([flow.ref for flow in expired])
    for flow in live:
        if flow.last != flow.published and flow.ref.entry >= 0:
            table.touch(flow.ref.entry, flow.last)
            flow.published = flow.last
