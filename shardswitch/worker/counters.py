"""What a worker counts: traffic, drops by reason, and events.

Theory of operation.  One vocabulary for every module of the worker:

* a **drop** is a frame (either way) that was not passed on, counted under a
  :class:`~shardswitch.net.drop.DropReason` - the packet layer's reasons for a
  guest frame it refused, then the worker's own (no RX buffers, no host
  socket, a full flow table...);
* an **event** (:class:`Event`) is something worth counting that loses no
  frame: a ring the guest broke, an ICMP error relayed to the guest.

Both are plain ``Counter``\\ s keyed by the enum members (one dictionary
update each, no string building on the packet path); ``shardswitch status``
shows them by name, drops and events apart (:meth:`Counters.by_name`).
"""

from __future__ import annotations

from collections import Counter
from enum import IntEnum

from shardswitch.net.drop import DropReason


class Event(IntEnum):
    """Things a worker counts that are not drops (stable, user-visible names; add at the end)."""

    #: The guest broke a virtqueue (a bad index or descriptor): that ring stopped.
    BROKEN_RING = 1
    #: An ICMP error about a guest datagram (port unreachable...) was relayed to the guest.
    UDP_HOST_ICMP_ERROR = 2
    #: A ring started marking the pages it writes in the dirty-page log (a live migration began).
    DIRTY_LOG_RING = 3
    #: A TCP connection moved with its socket state (TCP_REPAIR), counted on each side of a migration.
    TCP_MIGRATED = 4
    #: A TCP connection could not move (no TCP_REPAIR helper, or its state did not allow it): reset both ways.
    TCP_MIGRATION_RESET = 5
    #: A UDP or echo flow was handed over in a migration (saved on the source, re-created on the target).
    FLOW_MIGRATED = 6
    #: Moving connections (or their guards) could not be frozen: segments during the handover may be reset.
    TCP_MIGRATION_UNFROZEN = 7
    #: A handler of a flow (its socket, its timer) raised an unexpected error: that flow was closed, the
    #: worker went on (the traceback is logged, rate-limited).
    FLOW_FAULT = 8
    #: A handler outside any flow (a listener, an inbox, a batch flush, a control message) raised an
    #: unexpected error; the worker went on (the traceback is logged, rate-limited).
    HANDLER_FAULT = 9
    #: A flow of a migration's device state that the flow policy refused (not restored; TCP: reset).
    MIGRATED_FLOW_REFUSED = 10


class Counters:
    """Traffic counters of one worker (TX = from the guest, RX = to the guest), drops and events."""

    def __init__(self) -> None:
        """All zero."""
        self.tx_frames = 0
        self.tx_bytes = 0
        self.rx_frames = 0
        self.rx_bytes = 0
        self.drops: Counter[DropReason] = Counter()
        self.events: Counter[Event] = Counter()

    @staticmethod
    def by_name(counts: Counter[DropReason] | Counter[Event]) -> dict[str, int]:
        """Non-zero counts by member name (for the status answer)."""
        return {member.name: count for member, count in counts.items() if count}
