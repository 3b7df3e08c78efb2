"""The worker's generic flow layer: passt's flow.c, on the shared flow table.

Theory of operation
-------------------
Every flow - an echo flow, a UDP flow, a TCP connection - has the same life
around its protocol: it is looked up by the guest side of its addresses,
entered in the shared flow table (:mod:`shardswitch.shm`) so that every
worker and ``shardswitch flows`` can see it, kept in this worker's local
index, given a host socket whose readiness reaches it, timed once a second,
and finally removed.  This module does all of that once; a protocol plugs in
with a small table of hooks (:class:`FlowHooks`) and does only what is its
own.

* **Local index.**  :attr:`FlowLayer.flows` maps a flow's guest-side key
  (:func:`~shardswitch.shm.layout.pack_key`: type, addresses and ports) to
  the flow.  The per-packet path of a flow this worker owns is one dictionary
  lookup: no lock, no shared write.
* **Enter or hand over.**  A guest frame whose flow is not in the index
  (:meth:`FlowLayer.find`) may belong to a flow another worker owns (the
  guest's sender moved to another CPU, so to another TX queue): the table
  says so, and :class:`HandOver` is raised with the owner's queue pair.  The
  worker catches it at one place - where it handles frames - and hands the
  frame, unchanged, to the owner's inbox.  An entry this queue pair's
  previous process left is removed, and the flow is created anew here.  Two
  workers creating the same flow at once end with one flow: the table refuses
  the second activation (:meth:`FlowLayer.enter`), and the loser hands over.
* **Descriptors.**  A flow's host socket is watched through the worker
  (:meth:`FlowLayer.add`); readiness reaches the protocol's
  :meth:`FlowHooks.on_socket` with the flow itself, through the layer's
  descriptor-to-flow map.
* **Deferred handling.**  Once a second (:meth:`FlowLayer.tick`) every flow's
  timer hook runs; the flows it says are over are closed and leave the table
  in one batch (one write lock), the activity times and idle timeouts
  (:attr:`FlowBase.idle_timeout`, for ``shardswitch flows``) that changed
  are published (one unlocked store each: only the owner writes its
  entries' times), and each protocol's deferred hook runs (e.g. refilling
  pools).
* **Where a new flow goes** is decided in one place,
  :meth:`~shardswitch.worker.fwd.Forwarding.target` (reached as
  :attr:`FlowLayer.fwd`): :meth:`FlowLayer.find` asks it for every guest
  frame that starts a flow and returns the answer as a :class:`NewFlow`, or
  raises its refusal; flows restored by a migration ask
  :meth:`FlowLayer.new_flow`, the same question.  A protocol never computes a
  target itself.  The policy's cheap class checks (loopback, multicast...)
  run before the table's lock is taken, so refused frames cost no lock.
* **Faults stay with their flow.**  Every handler the layer calls for a flow
  (socket readiness, timers) runs under :meth:`FlowLayer.guard`: an
  unexpected exception is counted (``FLOW_FAULT``), logged rate-limited with
  its traceback, and ends that flow only (the protocol's ``abort`` hook, a
  reset where it can), never the worker.

Without a table (unit tests of one worker) every flow is this worker's and
gets a dummy reference.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, TypeVar

from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.inany import InAny
from shardswitch.shm.layout import FlowRef, FlowSide, FlowTableError, FlowType, Pif, TableFullError, pack_key
from shardswitch.shm.table import FlowTable
from shardswitch.worker.counters import Event
from shardswitch.worker.fwd import Forwarding
from shardswitch.worker.port import READABLE, WorkerPort

log = logging.getLogger("shardswitch.worker")

#: The reference of a flow that is in no table.
NO_REF = FlowRef(-1, 0)


class HandOver(Exception):
    """The frame being handled belongs to a flow another worker owns: give it to that worker, unchanged."""

    def __init__(self, owner: int) -> None:
        """``owner``: the queue pair whose worker owns the flow."""
        super().__init__(f"flow owned by queue pair {owner}")
        self.owner = owner


class NewFlow(NamedTuple):
    """A flow the guest may start, not created yet: its key and where the flow policy says it goes."""

    #: Key of its guest side in the local index.
    key: bytes
    #: The guest side as the guest's frame has it.
    guest_side: FlowSide
    #: Where it goes on the host (after the mapping) and the port there.
    target: InAny
    port: int


@dataclass(slots=True, eq=False, kw_only=True)
class FlowBase:
    """What the flow layer keeps of every flow; each protocol's flow class extends it."""

    #: The flow's entry in the shared table (:data:`NO_REF` without a table).
    ref: FlowRef
    #: Its type, which selects its protocol's hooks.
    ftype: FlowType
    #: Key of its guest side in the local index.
    key: bytes
    #: Last activity (monotonic seconds), and the value last written to the table.
    last: float
    published: float = 0.0
    #: Seconds of idleness after which its protocol ends it, for ``shardswitch flows`` (0: none), and the value
    #: last written to the table.
    idle_timeout: int = 0
    published_timeout: int = 0
    #: The host socket watched for it (-1: none of its own, e.g. a shared listening socket).
    fd: int = -1
    #: Closed: no longer in the index (events still queued for it are ignored).
    closed: bool = False


F_contra = TypeVar("F_contra", bound=FlowBase, contravariant=True)


class FlowHooks(Protocol[F_contra]):
    """What a protocol plugs into the flow layer for its flow types."""

    #: The drop reason of a new flow refused because the table is full.
    table_full: DropReason
    #: The drop reason of a new flow whose twin another worker entered first, when there is no frame of the
    #: guest to hand over (a host-initiated flow, or a twin gone again by the time it was looked up).
    conflict: DropReason

    def on_socket(self, flow: F_contra) -> None:
        """The flow's host socket is ready (readable, writable or in error)."""

    def timer(self, flow: F_contra, now: float) -> bool:
        """The flow's once-a-second timers; True when it is over (the layer then closes it)."""

    def release(self, flow: F_contra) -> None:
        """Free what the protocol holds for the flow (its socket); the layer has forgotten it."""

    def deferred(self, now: float) -> None:
        """Once a second, after the flows' timers (pools, caches)."""

    def abort(self, flow: F_contra) -> None:
        """A handler of the flow raised unexpectedly: end it as a failure (TCP: reset both ways); the
        layer closes it afterwards if this did not."""


class FlowLayer:
    """Every flow this worker owns, whatever its protocol."""

    def __init__(self, port: WorkerPort, table: FlowTable | None, fwd: Forwarding) -> None:
        """The flows of ``port``'s worker, entered in ``table`` (None: no table), mapped by ``fwd``."""
        self.port = port
        self.table = table
        self.fwd = fwd
        #: The local index: guest-side key -> flow.
        self.flows: dict[bytes, FlowBase] = {}
        #: Host sockets of flows: descriptor -> flow.
        self.by_fd: dict[int, FlowBase] = {}
        self._hooks: dict[int, FlowHooks[Any]] = {}
        self._kinds: list[FlowHooks[Any]] = []

    def register(self, ftypes: tuple[FlowType, ...], hooks: FlowHooks[Any]) -> None:
        """Plug a protocol in for its flow types."""
        for ftype in ftypes:
            self._hooks[ftype] = hooks
        self._kinds.append(hooks)

    # -- finding and entering ---------------------------------------------------

    def find(self, ftype: FlowType, guest_side: FlowSide) -> FlowBase | NewFlow:
        """The flow of a guest frame, if this worker has it, else where a new one would go.

        Raises :class:`HandOver` when another worker owns it, PacketError
        when the flow policy refuses a new flow (its reason says why).  A
        :class:`NewFlow`: the flow is new here (an entry left by this pair's
        previous process is removed first) and the caller may create it.
        """
        key = pack_key(ftype, guest_side)
        flow = self.flows.get(key)
        if flow is not None:
            return flow
        fwd = self.fwd
        # No flow has such addresses: refused before the table's lock.
        fwd.policy.screen(guest_side.ep_addr, guest_side.our_addr, None)
        table = self.table
        if table is not None:
            hit = table.lookup_key(key)
            if hit is not None:
                if hit.owner != self.port.pair:
                    raise HandOver(hit.owner)
                table.remove_many([hit.ref])
        target, port = fwd.target(ftype, guest_side)
        return NewFlow(key, guest_side, target, port)

    def new_flow(self, ftype: FlowType, guest_side: FlowSide) -> NewFlow:
        """Where a guest-side flow restored by a migration goes: the same decision as :meth:`find`'s
        (PacketError when the policy refuses it)."""
        target, port = self.fwd.target(ftype, guest_side)
        return NewFlow(pack_key(ftype, guest_side), guest_side, target, port)

    def enter(self, ftype: FlowType, initiator: FlowSide, target: FlowSide, now: float) -> FlowRef:
        """Enter a new flow in the table (the whole life cycle at once).

        Raises PacketError with the protocol's ``table_full`` reason when the
        table is full; :class:`HandOver` when another worker entered the same
        guest-initiated flow first; PacketError with the protocol's
        ``conflict`` reason when there is no frame to hand over.
        """
        if initiator.pif == Pif.GUEST:
            self.fwd.learn_guest(initiator.ep_addr)
        table = self.table
        if table is None:
            return NO_REF
        try:
            ref = table.enter(ftype, initiator, target, self.port.pair, now)
        except TableFullError as err:
            self.port.loglimit.warning("table full", "%s flow not created: %s", ftype.name, err)
            raise PacketError(self._hooks[ftype].table_full, str(err)) from None
        except FlowTableError as err:
            self.port.loglimit.error("table error", "%s flow not created: %s", ftype.name, err)
            raise PacketError(DropReason.INTERNAL_ERROR, str(err)) from None
        if ref is not None:
            return ref
        hit = table.lookup(ftype, initiator)
        if initiator.pif == Pif.GUEST and hit is not None and hit.owner != self.port.pair:
            raise HandOver(hit.owner)
        raise PacketError(self._hooks[ftype].conflict, "another worker entered the same flow")

    def add(self, flow: FlowBase, sock_fd: int = -1, events: int = READABLE) -> None:
        """Index a flow just entered (its idle timeout, if it has one, published at once); watch its own socket
        ``sock_fd`` (if any) for ``events``."""
        self.flows[flow.key] = flow
        if flow.idle_timeout and self.table is not None and flow.ref.entry >= 0:
            self.table.publish_timeout(flow.ref.entry, flow.idle_timeout)
            flow.published_timeout = flow.idle_timeout
        if sock_fd >= 0:
            flow.fd = sock_fd
            self.by_fd[sock_fd] = flow
            self.port.watch(sock_fd, functools.partial(self._on_fd, sock_fd), events)

    def _on_fd(self, fd: int) -> None:
        """A flow's socket is ready: its protocol's hook, with the flow (guarded)."""
        flow = self.by_fd.get(fd)
        if flow is not None:
            self.guard(flow, self._hooks[flow.ftype].on_socket, flow)

    def guard(self, flow: FlowBase, action: Callable[..., object], *args: Any) -> bool:
        """Run ``action(*args)`` for ``flow``; an unexpected exception costs that flow only: counted
        (FLOW_FAULT), logged rate-limited with its traceback, the flow aborted and closed.  Whether the
        action ran to its end."""
        try:
            action(*args)
            return True
        except Exception:
            self.fault(flow)
            return False

    def fault(self, flow: FlowBase) -> None:
        """A handler of ``flow`` raised (called from an ``except`` block): count, log, end the flow."""
        port = self.port
        port.count(Event.FLOW_FAULT)
        port.loglimit.error("flow fault", "worker %d: %s flow closed after an internal error", port.pair,
                            flow.ftype.name, exc_info=True)
        if flow.closed:
            return
        try:
            self._hooks[flow.ftype].abort(flow)
        except Exception:
            port.loglimit.error("flow fault", "worker %d: aborting the %s flow failed too", port.pair,
                                flow.ftype.name, exc_info=True)
        if not flow.closed:
            self.close(flow)

    # -- closing ----------------------------------------------------------------------

    def _forget(self, flow: FlowBase) -> bool:
        """Take a flow out of the index and its socket out of the watch list; False if already closed."""
        if flow.closed:
            return False
        flow.closed = True
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        if flow.fd >= 0:
            self.port.unwatch(flow.fd)
            self.by_fd.pop(flow.fd, None)
        self._hooks[flow.ftype].release(flow)
        return True

    def close(self, flow: FlowBase) -> None:
        """Close one flow now: forget it, let its protocol release it, remove it from the table."""
        if self._forget(flow) and self.table is not None and flow.ref.entry >= 0:
            self.table.remove_many([flow.ref])

    def close_all(self) -> None:
        """Close every flow (the worker is stopping; the coordinator frees the table entries)."""
        for flow in list(self.flows.values()):
            self._forget(flow)

    # -- deferred handling ------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Once a second: every flow's timers, the finished ones removed in one batch, activity and idle timeouts
        published."""
        hooks = self._hooks
        # A timer may close another flow of the same pass (e.g. a reset): closed flows are skipped.
        over = []
        for flow in list(self.flows.values()):
            if flow.closed:
                continue
            try:
                ended = hooks[flow.ftype].timer(flow, now)
            except Exception:
                self.fault(flow)
                continue
            if ended and not flow.closed:
                over.append(flow)
        for flow in over:
            self._forget(flow)
        table = self.table
        if table is not None:
            if over:
                table.remove_many([flow.ref for flow in over if flow.ref.entry >= 0])
            for flow in self.flows.values():
                if flow.ref.entry < 0:
                    continue
                if flow.last != flow.published:
                    table.touch(flow.ref.entry, flow.last)
                    flow.published = flow.last
                if flow.idle_timeout != flow.published_timeout:
                    table.publish_timeout(flow.ref.entry, flow.idle_timeout)
                    flow.published_timeout = flow.idle_timeout
        for kind in self._kinds:
            try:
                kind.deferred(now)
            except Exception:
                self.port.count(Event.HANDLER_FAULT)
                self.port.loglimit.error("handler fault", "worker %d: deferred handler failed", self.port.pair,
                                         exc_info=True)

    def count(self) -> int:
        """Flows this worker owns."""
        return len(self.flows)
