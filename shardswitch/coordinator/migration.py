"""The coordinator's side of a live migration: the device-state pipe, the workers' parts, the repair helper.

Theory of operation
-------------------
**Save** (source, SET_DEVICE_STATE_FD with direction SAVE).  Before
answering, :meth:`Migration.begin` asks each worker in turn for its flows
(``MigrateSave``, with a memfd to write them into and the TCP_REPAIR helper's
connection lent for the request) and builds the document
(:mod:`shardswitch.migration.format`) with the guest's MAC and IPv6 address
from the flow table's header.  The answer goes out; the selector loop then
writes the document into QEMU's pipe as it drains (:meth:`Migration.on_pipe`)
and closes it, which is QEMU's end of file.  The document is kept: should the
rings start again on this side afterwards (the migration failed later and the
guest resumes here), :meth:`Migration.rollback` loads it back.

**Load** (target, direction LOAD).  The selector loop reads QEMU's pipe until
end of file, a chunk per call, and stops at the bounds of this switch's flow
table (:class:`~shardswitch.migration.admit.Bounds`: the bytes a document of
as many flows as the table holds may take): a larger document is refused
there, unread beyond.  At end of file the document's header and outline are
checked (more flows than the table holds is refused before any flow is
decoded), then a :class:`~shardswitch.coordinator.restore.Restore` checks its
flows a batch per loop iteration and, all checked, has each pair's part
restored by its worker, the answers read by the loop.  A document that does
not decode or check is refused: the error is logged, nothing is applied, and
CHECK_DEVICE_STATE answers failure, so QEMU fails the migration and the
switch serves on.  The coordinator's loop is never held by the document:
no step costs more than one read, one outline or one batch of flows.

**CHECK_DEVICE_STATE** answers 0 when the last transfer succeeded.  QEMU sends
it once it has read our end of file (save) or closed its end (load).  Asked
while a transfer or a restore is still under way, the answer waits for its
end (:meth:`Migration.check` gives None, :meth:`Migration.answer` the answer
later), and so does every later request of the front-end
(:meth:`Migration.holds_frontend`), while the loop serves everything else; a
transfer still open :data:`FINISH_TIMEOUT` seconds after the question fails.

**Repair helper.**  With ``--repair-path`` the coordinator listens on a unix
socket (mode 0600) for one helper (:mod:`shardswitch.migration.repair`), which
must run as root or as the switch's own user.  Without one, connections are
reset instead of moved, and counted.  Its connection is watched between
requests: end of file drops it, and the HELLO byte our own helper sends marks
it as one that also freezes connections (passt-repair does not).  While a
worker has the connection for a restore the coordinator's loop goes on, so it
stops watching the connection while any worker has it (:meth:`Migration.lend`,
counted, so that the late answer of an abandoned restore does not end the loan
of the next): otherwise it could read the helper's reply meant for the worker.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import time
from typing import Callable, Protocol

from shardswitch.coordinator import fdcheck
from shardswitch.coordinator.device import DeviceError
from shardswitch.coordinator.restore import WORKER_TIMEOUT, Restore
from shardswitch.ipc import MigrateDone, MigrateSave
from shardswitch.migration import admit
from shardswitch.migration import format as fmt
from shardswitch.migration import repair
from shardswitch.shm.table import FlowTable
from shardswitch.vhost.wire import TransferDirection, TransferPhase

log = logging.getLogger("shardswitch.migration")

#: SET_DEVICE_STATE_FD's answer: success, and the "invalid FD" bit: we use the front-end's pipe.
REPLY_USE_YOUR_FD = 0x100
#: Error code in SET_DEVICE_STATE_FD's answer, and CHECK_DEVICE_STATE's failure.
REPLY_FAILED = 1
#: How long CHECK_DEVICE_STATE waits for the rest of a transfer.
FINISH_TIMEOUT = 10.0
CHUNK = 1 << 20
_UCRED = struct.Struct("iII")


class WorkerCalls(Protocol):
    """What the migration needs from the worker pool."""

    count: int

    def call(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = (),
             timeout: float = ...) -> object | None:
        """Send and wait for the answer; None when the worker died or timed out."""

    def post(self, pair: int, message: object, fds: list[int] | tuple[int, ...],
             done: Callable[[object | None], None], timeout: float) -> bool:
        """Send a request whose answer goes to ``done`` once the loop reads it; False when not sent."""

    def expire(self, now: float) -> float | None:
        """Answer None to posted requests past their deadline; seconds until the next deadline."""


class Transfer:
    """One device-state transfer through QEMU's pipe."""

    def __init__(self, direction: TransferDirection, fd: int, data: bytes = b"") -> None:
        """``data``: the document to write (SAVE)."""
        self.direction = direction
        self.fd = fd
        self.out = memoryview(data)
        self.size = len(data)
        self.received = bytearray()


class Migration:
    """Live-migration state of one coordinator."""

    def __init__(self, pool: WorkerCalls, sel: selectors.BaseSelector, table: Callable[[], FlowTable | None],
                 next_seq: Callable[[], int], repair_path: str = "", capacity: int = 0) -> None:
        """Serve ``pool``'s workers in ``sel``'s loop; ``table``: the flow table once created; ``next_seq``:
        request numbers shared with the device's (an answer is matched by its number); ``capacity``: the
        flows the table holds, which bounds the documents loaded (0: the format's limits alone)."""
        self.pool = pool
        self.bounds = admit.Bounds.for_table(capacity) if capacity else \
            admit.Bounds(fmt.MAX_FLOWS * fmt.MAX_PAIRS, fmt.MAX_STATE)
        self._next_seq = next_seq
        self.sel = sel
        self.table = table
        self.repair_path = repair_path
        self.listener: socket.socket | None = None
        self.helper: socket.socket | None = None
        #: The helper said HELLO: it is ours and freezes connections (see migration.repair).
        self.helper_freezes = False
        #: Workers' requests that have the helper's connection: the loop does not watch it meanwhile.
        self.helper_loans = 0
        self.transfer: Transfer | None = None
        #: A document being checked or restored (after a load, or a rollback).
        self.restore: Restore | None = None
        #: CHECK_DEVICE_STATE was asked while a transfer or restore was under way; the answer is due by then.
        self.check_waiting = False
        self.check_deadline = 0.0
        #: CHECK_DEVICE_STATE's answer: 0 after a transfer that succeeded; no transfer yet is a failure.
        self.result = REPLY_FAILED
        #: The last document saved, for a rollback (None after a load or a reset).
        self.saved: bytes | None = None
        #: What the last transfer moved, for ``shardswitch status``.
        self.last: dict[str, object] = {}
        #: QEMU was told a save succeeded (:meth:`take_source_done`).
        self.source_done = False

    # -- the repair helper ---------------------------------------------------------

    def listen(self) -> None:
        """Bind the repair socket (before privileges are dropped); nothing without a path."""
        if not self.repair_path:
            return
        try:
            os.unlink(self.repair_path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.repair_path)
            os.chmod(self.repair_path, 0o600)
            sock.listen(1)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, self._on_listener)
        log.info("TCP_REPAIR helper socket %s (run: shardswitch repair-helper %s)", self.repair_path,
                 self.repair_path)

    def _on_listener(self) -> None:
        """A helper connects: keep it if it may be trusted and none is there yet."""
        assert self.listener is not None
        try:
            sock, _addr = self.listener.accept()
        except BlockingIOError:
            return
        pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid not in (0, os.geteuid()):
            log.error("TCP_REPAIR helper refused: pid %d runs as uid %d (root or uid %d expected)", pid, uid,
                      os.geteuid())
            sock.close()
            return
        if self.helper is not None:
            log.warning("a second TCP_REPAIR helper (pid %d) refused: one is connected", pid)
            sock.close()
            return
        sock.setblocking(True)
        self.helper = sock
        self.sel.register(sock, selectors.EVENT_READ, self._on_helper)
        log.info("TCP_REPAIR helper connected (pid %d): TCP connections can move", pid)

    def _on_helper(self) -> None:
        """The helper's socket is readable outside a request: it went away."""
        assert self.helper is not None
        try:
            data = self.helper.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.helper.recv(len(data))
            if data == repair.HELLO and not self.helper_freezes:
                self.helper_freezes = True
                log.info("TCP_REPAIR helper is shardswitch's: connections are frozen while they move")
            return
        self._drop_helper("TCP_REPAIR helper disconnected: TCP connections will be reset, not moved")

    def _drop_helper(self, why: str) -> None:
        """Forget the helper."""
        if self.helper is not None:
            log.warning("%s", why)
            if not self.helper_loans:
                self.sel.unregister(self.helper)
            self.helper_loans = 0
            self.helper.close()
            self.helper = None
            self.helper_freezes = False

    def lend(self) -> socket.socket | None:
        """The helper's connection for a worker's request (None: no helper); unwatched until every
        request it was lent to is over (:meth:`give_back`)."""
        if self.helper is not None:
            if not self.helper_loans:
                self.sel.unregister(self.helper)
            self.helper_loans += 1
        return self.helper

    def give_back(self, helper: socket.socket | None) -> None:
        """A worker's request that had ``helper`` (what :meth:`lend` gave) is over: once no other has it,
        watch the connection again (end of file, HELLO).  A connection dropped meanwhile is forgotten."""
        if helper is None or helper is not self.helper:
            return
        self.helper_loans -= 1
        if not self.helper_loans:
            self.sel.register(helper, selectors.EVENT_READ, self._on_helper)

    # -- SET_DEVICE_STATE_FD -----------------------------------------------------------

    def begin(self, direction: TransferDirection, phase: TransferPhase, fd: int) -> int:
        """Start a transfer through ``fd`` (owned from here on); the answer's u64."""
        self.cancel()
        try:
            fdcheck.check_state_fd("SET_DEVICE_STATE_FD", fd, direction == TransferDirection.SAVE)
        except DeviceError as err:
            log.error("%s", err)
            os.close(fd)
            self.result = REPLY_FAILED
            return REPLY_USE_YOUR_FD | REPLY_FAILED
        os.set_blocking(fd, False)
        if direction == TransferDirection.SAVE:
            data = self._save()
            self.transfer = Transfer(direction, fd, data)
            self.sel.register(fd, selectors.EVENT_WRITE, self.on_pipe)
        else:
            self.transfer = Transfer(direction, fd)
            self.sel.register(fd, selectors.EVENT_READ, self.on_pipe)
        self.result = REPLY_FAILED          # until the transfer completes
        return REPLY_USE_YOUR_FD

    def cancel(self) -> None:
        """Drop a transfer or restore in progress (a new one replaces it, or the front-end went away)."""
        transfer, self.transfer = self.transfer, None
        if transfer is not None:
            log.warning("device-state transfer (%s) abandoned", transfer.direction.name)
            self.sel.unregister(transfer.fd)
            os.close(transfer.fd)
        restore, self.restore = self.restore, None
        if restore is not None:
            log.warning("device state %s abandoned while %s", restore.verb, restore.stage)
            restore.abandon()
        self.check_waiting = False

    def reset(self) -> None:
        """The front-end went away: no transfer, nothing to roll back."""
        self.cancel()
        self.saved = None
        self.result = REPLY_FAILED

    def on_pipe(self) -> None:
        """QEMU's pipe is ready: write more of the document, or read more of it (nothing when the transfer
        ended since the selector saw the pipe ready: CHECK_DEVICE_STATE in the same batch finished it)."""
        transfer = self.transfer
        if transfer is None:
            return
        try:
            if transfer.direction == TransferDirection.SAVE:
                written = os.write(transfer.fd, transfer.out[:CHUNK])
                transfer.out = transfer.out[written:]
                if not transfer.out:
                    self._finish_save(transfer)
            else:
                data = os.read(transfer.fd, CHUNK)
                if not data:
                    self._finish_load(transfer)
                elif len(transfer.received) + len(data) > self.bounds.size:
                    self._refuse(transfer, len(transfer.received) + len(data),
                                 f"larger than {self.bounds.describe()}")
                else:
                    transfer.received += data
        except BlockingIOError:
            return
        except OSError as err:
            self._end(transfer, f"device-state pipe: {err.strerror or err}")

    def check(self) -> int | None:
        """CHECK_DEVICE_STATE: 0 if the last transfer succeeded; None while a transfer or restore is still
        under way (the answer comes from :meth:`answer` once it is over)."""
        if self.transfer is None and self.restore is None:
            return self._answered(self.result)
        self.check_waiting = True
        self.check_deadline = time.monotonic() + FINISH_TIMEOUT
        return None

    def answer(self) -> int | None:
        """The answer to a CHECK_DEVICE_STATE asked while the transfer was under way, once it is over (once)."""
        if not self.check_waiting or self.transfer is not None or self.restore is not None:
            return None
        self.check_waiting = False
        return self._answered(self.result)

    def _answered(self, result: int) -> int:
        """``result`` goes to QEMU: a success after a save completes this side's part of a migration."""
        if result == 0 and self.last.get("direction") == "save":
            self.source_done = True
        return result

    def take_source_done(self) -> bool:
        """Whether an outgoing migration completed since the last call (QEMU was told the save succeeded)."""
        done, self.source_done = self.source_done, False
        return done

    def holds_frontend(self) -> bool:
        """Whether the front-end's requests must wait: its CHECK_DEVICE_STATE is not answered yet, or its
        workers are being given a document (its requests would need them)."""
        return self.check_waiting or self.restore is not None

    def tick(self, now: float) -> float | None:
        """The loop's turn: one step of a restore, the deadlines of a transfer asked about and of the workers'
        answers; seconds until the next turn is due (0: at once; None: nothing due)."""
        waits = [self.pool.expire(now)]
        transfer = self.transfer
        if transfer is not None and self.check_waiting:
            if now >= self.check_deadline:
                self._end(transfer, "device-state transfer not finished when QEMU asked for its result")
            else:
                waits.append(self.check_deadline - now)
        restore = self.restore
        if restore is not None:
            if restore.step():
                waits.append(0.0)
            if restore.finished:
                self._restored(restore)
        due = [wait for wait in waits if wait is not None]
        return min(due) if due else None

    def progress(self) -> dict[str, object] | None:
        """The transfer or restore under way, for ``shardswitch status`` (None: none)."""
        if self.transfer is not None:
            transfer = self.transfer
            done = len(transfer.received) if transfer.direction == TransferDirection.LOAD else \
                transfer.size - len(transfer.out)
            return {"direction": transfer.direction.name.lower(), "stage": "transfer", "bytes": done,
                    "limit": self.bounds.size, "check_waiting": self.check_waiting}
        if self.restore is not None:
            return {"direction": self.restore.verb, **self.restore.progress(), "check_waiting": self.check_waiting}
        return None

    def _end(self, transfer: Transfer, error: str = "", *, keep_result: bool = False) -> None:
        """Close the pipe; ``error`` (logged) makes the result a failure, none a success (unless
        ``keep_result``: a restore decides)."""
        self.sel.unregister(transfer.fd)
        os.close(transfer.fd)
        self.transfer = None
        if error:
            log.error("%s", error)
            self.result = REPLY_FAILED
        elif not keep_result:
            self.result = 0

    # -- save -----------------------------------------------------------------------

    def _save(self) -> bytes:
        """Every worker's flows in one document (a worker that fails contributes none)."""
        table = self.table()
        pairs = []
        totals = {"tcp_moved": 0, "tcp_reset": 0, "other": 0}
        for pair in range(self.pool.count):
            memfd = os.memfd_create("shardswitch-state", os.MFD_CLOEXEC)
            try:
                done = self._call(pair, MigrateSave(seq=self._next_seq(), has_repair=self.helper is not None,
                                                          helper_freezes=self.helper_freezes), memfd)
                if done is not None:
                    pairs.append(fmt.decode_pair(os.pread(memfd, done.size, 0)))
                    self._add(totals, done)
            except (fmt.StateError, OSError) as err:
                log.error("worker %d: its flows could not be saved: %s", pair, err)
            finally:
                os.close(memfd)
        state = fmt.DeviceState(guest_mac=table.guest_mac() if table else None,
                                guest6=table.guest6() if table else None, pairs=pairs)
        data = fmt.encode(state)
        self.last = {"direction": "save", "bytes": len(data), **totals}
        log.info("device state saved: %d bytes, %d TCP connection(s) moved, %d reset, %d other flow(s)",
                 len(data), totals["tcp_moved"], totals["tcp_reset"], totals["other"])
        return data

    def _finish_save(self, transfer: Transfer) -> None:
        """The whole document is in the pipe: close it (QEMU's end of file), keep it for a rollback."""
        self.saved = bytes(transfer.out.obj)
        self._end(transfer)

    # -- load -----------------------------------------------------------------------

    def _finish_load(self, transfer: Transfer) -> None:
        """End of file: the document's outline is checked, then a restore checks and applies its flows."""
        size = len(transfer.received)
        try:
            admission = admit.outline(memoryview(transfer.received), self.bounds)
        except fmt.StateError as err:
            self._refuse(transfer, size, str(err))
            return
        self._end(transfer, keep_result=True)
        self.saved = None
        self.restore = self._restore(admission, "loaded")

    def _refuse(self, transfer: Transfer, size: int, why: str) -> None:
        """A document refused after ``size`` bytes: the pipe closes, nothing is applied, the result fails."""
        self.last = {"direction": "load", "bytes": size, "error": why}
        self._end(transfer, f"device state refused ({size} bytes): {why}")

    def rollback(self) -> None:
        """The guest resumed here after a save: its flows come back from the saved document."""
        data, self.saved = self.saved, None
        if data is None:
            return
        log.warning("the guest resumed on this side after its state was saved (the migration failed): "
                    "restoring its flows")
        try:                     # our own document, from our own table: only the byte limit could be too low
            admission = admit.outline(data, admit.Bounds(self.bounds.flows, max(len(data), self.bounds.size)))
        except fmt.StateError as err:
            log.error("the saved device state cannot be restored: %s", err)
            return
        self.cancel()
        self.restore = self._restore(admission, "restored")

    def _restore(self, admission: admit.Admission, verb: str) -> Restore:
        """A restore of ``admission`` by the workers, driven by :meth:`tick`."""
        return Restore(admission, verb, self.pool, self.table, self._next_seq, self)

    def _restored(self, restore: Restore) -> None:
        """A restore is over: the result, the status and the log say how it went."""
        self.restore = None
        admission = restore.admission
        if restore.error:
            self.last = {"direction": "load", "bytes": admission.size, "error": restore.error}
            log.error("device state refused (%d bytes): %s", admission.size, restore.error)
            if restore.verb == "loaded":
                self.result = REPLY_FAILED
            return
        if restore.verb == "loaded":
            self.result = 0
        totals = restore.totals
        self.last = {"direction": restore.verb, "flows": admission.flows, **totals}
        log.info("device state %s: %d TCP connection(s) moved, %d reset, %d other flow(s)", restore.verb,
                 totals["tcp_moved"], totals["tcp_reset"], totals["other"])

    # -- helpers ----------------------------------------------------------------------

    def _call(self, pair: int, message: MigrateSave, memfd: int) -> MigrateDone | None:
        """One worker request with the memfd (and the helper's connection); None when it failed."""
        fds = [memfd] + ([self.helper.fileno()] if self.helper is not None else [])
        answer = self.pool.call(pair, message, fds, timeout=WORKER_TIMEOUT)
        if not isinstance(answer, MigrateDone):
            log.error("worker %d did not answer %s", pair, type(message).__name__)
            return None
        if answer.error:
            log.error("worker %d: %s: %s", pair, type(message).__name__, answer.error)
            return None
        return answer

    @staticmethod
    def _add(totals: dict[str, int], done: MigrateDone) -> None:
        """Add one worker's counts."""
        totals["tcp_moved"] += done.tcp_moved
        totals["tcp_reset"] += done.tcp_reset
        totals["other"] += done.other

    def close(self) -> None:
        """Close the transfer, the helper and the listener (the socket file is the server's to remove)."""
        self.cancel()
        self._drop_helper("closing the TCP_REPAIR helper connection")
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
