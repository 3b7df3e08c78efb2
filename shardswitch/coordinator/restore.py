"""A device state restored without blocking the coordinator: its flows checked in steps, then restored by the
workers, the answers read by the loop.

Theory of operation
-------------------
A :class:`Restore` starts from a document whose outline passed
(:func:`~shardswitch.migration.admit.outline`: within the target's bounds).
The coordinator's loop calls :meth:`Restore.step` (through
:meth:`~shardswitch.coordinator.migration.Migration.tick`) for as long as it
answers True, serving its other sockets between calls; each call checks one
batch of flows.  A flow that fails its checks ends the restore with the error
before anything is applied.

Once every flow has passed, the guest's addresses go into the flow table's
header and each queue pair's part of the document goes to its worker,
``MigrateLoad`` with a memfd holding the part and the TCP_REPAIR helper's
connection lent (the coordinator stops watching it until the answer, so that it
never reads a reply meant for the worker), *posted* (:meth:`~shardswitch.coordinator.workers.WorkerPool.post`):
the loop reads the answer when it comes.  Parts go one at a time, the next
when the previous one is answered, since the helper's connection serves one
request at a time; a document's queue pair beyond this switch's goes to its
number modulo the count.  A worker that dies or overruns
:data:`WORKER_TIMEOUT` counts as having restored nothing.  After the last
answer the restore is :attr:`~Restore.finished`, with its totals.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Protocol

from shardswitch.ipc import MigrateDone, MigrateLoad
from shardswitch.migration import admit
from shardswitch.migration import format as fmt
from shardswitch.shm.table import FlowTable

log = logging.getLogger("shardswitch.migration")

#: How long a worker may take to save or load its flows.
WORKER_TIMEOUT = 30.0


class Posting(Protocol):
    """What a restore needs from the worker pool."""

    count: int

    def post(self, pair: int, message: object, fds: list[int] | tuple[int, ...],
             done: Callable[[object | None], None], timeout: float) -> bool:
        """Send a request whose answer goes to ``done`` (None: none came); False when it could not be sent."""


class HelperLoan(Protocol):
    """The TCP_REPAIR helper's connection, lent to one worker request at a time."""

    def lend(self) -> socket.socket | None:
        """The connection (None: no helper), unwatched by the coordinator until it is given back."""

    def give_back(self, helper: socket.socket | None) -> None:
        """The request that had ``helper`` (what :meth:`lend` gave) is over."""


class Restore:
    """One admitted document on its way into the workers."""

    def __init__(self, admission: admit.Admission, verb: str, pool: Posting, table: Callable[[], FlowTable | None],
                 next_seq: Callable[[], int], helper: HelperLoan) -> None:
        """Restore ``admission``'s flows (``verb``: "loaded" or "restored", for the log) through ``pool``;
        ``table``: the flow table, ``next_seq``: request numbers, ``helper``: lends the TCP_REPAIR helper's
        connection for each part."""
        self.admission = admission
        self.verb = verb
        self.pool = pool
        self.table = table
        self.next_seq = next_seq
        self.helper = helper
        #: "checking" (flows in batches), then "applying" (parts with the workers).
        self.stage = "checking"
        #: Why the document was refused (a flow failed its checks); nothing was applied then.
        self.error = ""
        self.finished = False
        #: What the workers reported.
        self.totals = {"tcp_moved": 0, "tcp_reset": 0, "other": 0}
        self._next_part = 0
        self._waiting = False
        #: The helper's connection lent to the part in flight (None: none).
        self._lent: socket.socket | None = None
        self._abandoned = False

    def step(self) -> bool:
        """One bounded piece of work; whether more waits for the next step (False: the workers' answers
        drive it now, or it is finished)."""
        if self.stage != "checking" or self.finished:
            return False
        try:
            if not self.admission.step():
                return True
        except fmt.StateError as err:
            self.error = str(err)
            self.finished = True
            return False
        self.stage = "applying"
        self._publish()
        self._post_next()
        return False

    def abandon(self) -> None:
        """Stop here (the front-end went away, or another transfer began): answers yet to come are ignored."""
        self._abandoned = True
        self.finished = True

    def progress(self) -> dict[str, object]:
        """Where the restore is, for ``shardswitch status``."""
        return {"stage": self.stage, "flows": self.admission.flows, "checked": self.admission.checked,
                "parts": len(self.admission.pairs), "parts_done": self._next_part - self._waiting}

    def _publish(self) -> None:
        """The guest's addresses into the flow table's header."""
        table = self.table()
        if table is not None:
            if self.admission.guest_mac is not None:
                table.publish_guest_mac(self.admission.guest_mac)
            if self.admission.guest6 is not None:
                table.publish_guest6(self.admission.guest6)

    def _post_next(self) -> None:
        """Post the next part to its worker; finished when none is left."""
        while self._next_part < len(self.admission.pairs) and not self._abandoned:
            part, data = self.admission.part(self._next_part)
            self._next_part += 1
            pair = part % self.pool.count
            if pair != part:
                log.warning("flows of queue pair %d go to queue pair %d (this switch has %d)", part, pair,
                            self.pool.count)
            if self._post(pair, data):
                self._waiting = True
                return
        self.finished = True

    def _post(self, pair: int, data: bytes) -> bool:
        """``data`` to ``pair``'s worker in a memfd (with the helper's connection); whether it was sent."""
        try:
            memfd = os.memfd_create("shardswitch-state", os.MFD_CLOEXEC)
        except OSError as err:
            log.error("worker %d: its flows could not be sent: %s", pair, err.strerror or err)
            return False
        helper = self._lent = self.helper.lend()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(memfd, view):]
            message = MigrateLoad(seq=self.next_seq(), size=len(data), has_repair=helper is not None,
                                  guest_mac=self.admission.guest_mac)
            fds = [memfd] + ([helper.fileno()] if helper is not None else [])
            if self.pool.post(pair, message, fds, lambda answer: self._answered(pair, answer), WORKER_TIMEOUT):
                return True
            log.error("worker %d: its flows could not be sent", pair)
        except OSError as err:
            log.error("worker %d: its flows could not be sent: %s", pair, err.strerror or err)
        finally:
            os.close(memfd)              # the worker has its own copy
        self._give_back()
        return False

    def _give_back(self) -> None:
        """The part in flight is over: the helper's connection goes back."""
        lent, self._lent = self._lent, None
        self.helper.give_back(lent)

    def _answered(self, pair: int, answer: object | None) -> None:
        """A worker's answer (None: none came, the pool said why): count it, post the next part."""
        self._waiting = False
        self._give_back()
        if self._abandoned:
            return
        if isinstance(answer, MigrateDone):
            if answer.error:
                log.error("worker %d: MigrateLoad: %s", pair, answer.error)
            else:
                self.totals["tcp_moved"] += answer.tcp_moved
                self.totals["tcp_reset"] += answer.tcp_reset
                self.totals["other"] += answer.other
        self._post_next()
