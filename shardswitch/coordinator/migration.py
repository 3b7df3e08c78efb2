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
end of file, at most :data:`~shardswitch.migration.format.MAX_STATE` bytes;
then the document is decoded and checked whole, the guest's addresses go
into the flow table's header and each pair's part to its worker
(``MigrateLoad``).  A document that does not decode or check is refused: the
error is logged, nothing is applied, and CHECK_DEVICE_STATE answers failure,
so QEMU fails the migration and the switch serves on.

**CHECK_DEVICE_STATE** answers 0 when the last transfer succeeded.  QEMU sends
it once it has read our end of file (save) or closed its end (load); a load
still being read then is finished at once, with a deadline.

**Repair helper.**  With ``--repair-path`` the coordinator listens on a unix
socket (mode 0600) for one helper (:mod:`shardswitch.migration.repair`), which
must run as root or as the switch's own user.  Without one, connections are
reset instead of moved, and counted.  Its connection is watched between
requests: end of file drops it, and the HELLO byte our own helper sends marks
it as one that also freezes connections (passt-repair does not).
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
from shardswitch.ipc import MigrateDone, MigrateLoad, MigrateSave
from shardswitch.migration import format as fmt
from shardswitch.migration import repair
from shardswitch.shm.table import FlowTable
from shardswitch.vhost.wire import TransferDirection, TransferPhase

log = logging.getLogger("shardswitch.migration")

#: SET_DEVICE_STATE_FD's answer: success, and the "invalid FD" bit: we use the front-end's pipe.
REPLY_USE_YOUR_FD = 0x100
#: Error code in SET_DEVICE_STATE_FD's answer, and CHECK_DEVICE_STATE's failure.
REPLY_FAILED = 1
#: How long a worker may take to save or load its flows.
WORKER_TIMEOUT = 30.0
#: How long CHECK_DEVICE_STATE waits for the rest of a load.
FINISH_TIMEOUT = 10.0
CHUNK = 1 << 20
_UCRED = struct.Struct("iII")


class WorkerCalls(Protocol):
    """What the migration needs from the worker pool."""

    count: int

    def call(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = (),
             timeout: float = ...) -> object | None:
        """Send and wait for the answer; None when the worker died or timed out."""


class Transfer:
    """One device-state transfer through QEMU's pipe."""

    def __init__(self, direction: TransferDirection, fd: int, data: bytes = b"") -> None:
        """``data``: the document to write (SAVE)."""
        self.direction = direction
        self.fd = fd
        self.out = memoryview(data)
        self.received = bytearray()
        self.error = ""


class Migration:
    """Live-migration state of one coordinator."""

    def __init__(self, pool: WorkerCalls, sel: selectors.BaseSelector, table: Callable[[], FlowTable | None],
                 next_seq: Callable[[], int], repair_path: str = "") -> None:
        """Serve ``pool``'s workers in ``sel``'s loop; ``table``: the flow table once created; ``next_seq``:
        request numbers shared with the device's (an answer is matched by its number)."""
        self.pool = pool
        self._next_seq = next_seq
        self.sel = sel
        self.table = table
        self.repair_path = repair_path
        self.listener: socket.socket | None = None
        self.helper: socket.socket | None = None
        #: The helper said HELLO: it is ours and freezes connections (see migration.repair).
        self.helper_freezes = False
        self.transfer: Transfer | None = None
        #: CHECK_DEVICE_STATE's answer: 0 after a transfer that succeeded; no transfer yet is a failure.
        self.result = REPLY_FAILED
        #: The last document saved, for a rollback (None after a load or a reset).
        self.saved: bytes | None = None
        #: What the last transfer moved, for ``shardswitch status``.
        self.last: dict[str, object] = {}

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
            self.sel.unregister(self.helper)
            self.helper.close()
            self.helper = None
            self.helper_freezes = False

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
        """Drop a transfer in progress (a new one replaces it, or the front-end went away)."""
        transfer, self.transfer = self.transfer, None
        if transfer is not None:
            log.warning("device-state transfer (%s) abandoned", transfer.direction.name)
            self.sel.unregister(transfer.fd)
            os.close(transfer.fd)

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
                elif len(transfer.received) + len(data) > fmt.MAX_STATE:
                    self._end(transfer, f"device state refused: more than {fmt.MAX_STATE} bytes")
                else:
                    transfer.received += data
        except BlockingIOError:
            return
        except OSError as err:
            self._end(transfer, f"device-state pipe: {err.strerror or err}")

    def check(self) -> int:
        """CHECK_DEVICE_STATE: finish a load still being read, then 0 if the last transfer succeeded."""
        transfer = self.transfer
        if transfer is not None:
            deadline = time.monotonic() + FINISH_TIMEOUT
            while self.transfer is transfer and time.monotonic() < deadline:
                ready = selectors.DefaultSelector()
                try:
                    ready.register(transfer.fd, selectors.EVENT_WRITE if transfer.direction ==
                                   TransferDirection.SAVE else selectors.EVENT_READ)
                    if ready.select(max(deadline - time.monotonic(), 0)):
                        self.on_pipe()
                finally:
                    ready.close()
            if self.transfer is transfer:
                self._end(transfer, "device-state transfer not finished when QEMU asked for its result")
        return self.result

    def _end(self, transfer: Transfer, error: str = "") -> None:
        """Close the pipe; ``error`` (logged) makes the result a failure."""
        self.sel.unregister(transfer.fd)
        os.close(transfer.fd)
        self.transfer = None
        if error:
            log.error("%s", error)
            self.result = REPLY_FAILED
        else:
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
        """End of file: decode, check, apply; the result says whether it was."""
        try:
            state = fmt.decode(bytes(transfer.received))
        except fmt.StateError as err:
            self.last = {"direction": "load", "error": str(err)}
            self._end(transfer, f"device state refused ({len(transfer.received)} bytes): {err}")
            return
        self._end(transfer)
        self.saved = None
        self._apply(state, "loaded")

    def rollback(self) -> None:
        """The guest resumed here after a save: its flows come back from the saved document."""
        data, self.saved = self.saved, None
        if data is None:
            return
        log.warning("the guest resumed on this side after its state was saved (the migration failed): "
                    "restoring its flows")
        self._apply(fmt.decode(data), "restored")

    def _apply(self, state: fmt.DeviceState, verb: str) -> None:
        """The guest's addresses into the flow table's header, each pair's flows to its worker."""
        table = self.table()
        if table is not None:
            if state.guest_mac is not None:
                table.publish_guest_mac(state.guest_mac)
            if state.guest6 is not None:
                table.publish_guest6(state.guest6)
        totals = {"tcp_moved": 0, "tcp_reset": 0, "other": 0}
        for part in state.pairs:
            pair = part.pair % self.pool.count
            if pair != part.pair:
                log.warning("flows of queue pair %d go to queue pair %d (this switch has %d)", part.pair, pair,
                            self.pool.count)
            data = fmt.encode_pair(part)
            memfd = os.memfd_create("shardswitch-state", os.MFD_CLOEXEC)
            try:
                os.write(memfd, data)
                done = self._call(pair, MigrateLoad(seq=self._next_seq(), size=len(data),
                                                    has_repair=self.helper is not None,
                                                    guest_mac=state.guest_mac), memfd)
                if done is not None:
                    self._add(totals, done)
            finally:
                os.close(memfd)
        self.last = {"direction": verb, "flows": state.flow_count(), **totals}
        log.info("device state %s: %d TCP connection(s) moved, %d reset, %d other flow(s)", verb,
                 totals["tcp_moved"], totals["tcp_reset"], totals["other"])

    # -- helpers ----------------------------------------------------------------------

    def _call(self, pair: int, message: MigrateSave | MigrateLoad, memfd: int) -> MigrateDone | None:
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
