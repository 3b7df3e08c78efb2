"""Repairing the lock and the table after a participant died.

Theory of operation
-------------------
The coordinator learns that a worker died (SIGCHLD / ``waitpid``) and calls
``FlowTable.recover(pid)``, which runs :func:`recover` under the registry
lock (so recoveries and registrations never overlap).  What is repaired
depends on the phase recorded in the dead process's participant slot:

* IDLE: nothing held.
* R_HELD: it was counted as a reader; the reader exit is run on its behalf.
* W_HELD: it held the turnstile and the room.  If the mutation record names a
  dead process, the table may be half changed: the entries are the truth, so
  the index, the free list and the counters are rebuilt from them
  (:meth:`~shardswitch.shm.store.FlowStore.rebuild`; the recoverer has
  exclusive access since the dead writer's lock is still held).  Then the
  writer exit is run on its behalf.
* R_WAIT, R_EXIT, W_WAIT, W_EXIT (or an unfinished earlier reset): what it
  held is ambiguous, so the lock is reset exactly: the epoch is made odd,
  live waiters abandon their attempts (see :mod:`shardswitch.shm.rwlock`),
  processes inside finish; once every live slot is IDLE, a dead writer's
  half-done mutation is repaired as above, the semaphores and counters are
  set to their idle values, the slots of all dead processes are cleared and
  the epoch ends.  If live participants do not get IDLE within ``timeout``,
  :class:`FlowTableError` is raised with the epoch still odd; calling
  ``recover`` again continues the reset.

Always, finally: the dead process's slot is cleared and, under the write
lock, in-progress (NEW..TYPED) entries whose allocator is not a live
registered participant are cancelled.  The text returned says what was done.

Liveness uses pid and process start time (:func:`~shardswitch.shm.segment.process_alive`),
so a zombie or a recycled pid counts as dead.  The recovering process must
be registered and must not hold the lock itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shardswitch.shm.layout import TRANSITIONAL, FlowTableError, Phase
from shardswitch.shm.rwlock import SLICE, Participants, RwLock
from shardswitch.shm.segment import Segment, process_alive
from shardswitch.shm.store import FlowStore


def live_pids(parts: Participants, exclude: int = 0) -> set[int]:
    """The pids of the registered participants that are alive (``exclude`` never is)."""
    return {pid for slot in parts.occupied()
            if (pid := parts.pid(slot)) != exclude and process_alive(pid, parts.start_time(slot))}


def dead_pids(parts: Participants) -> list[int]:
    """The pids of registered participants that are no longer alive."""
    return [pid for slot in parts.occupied()
            if not process_alive(pid := parts.pid(slot), parts.start_time(slot))]


def recover(segment: Segment, parts: Participants, lock: RwLock, store: FlowStore, own_slot: int,
            dead_pid: int, timeout: float | None) -> str:
    """Release what ``dead_pid`` held and repair the table; returns a description."""
    with segment.registry_lock():
        if lock.phase() != Phase.IDLE:
            raise FlowTableError("recover() called while this process holds the lock")
        slot = parts.find(dead_pid) if dead_pid > 0 else None
        if slot == own_slot:
            raise FlowTableError("a process cannot recover itself")
        if slot is not None and process_alive(dead_pid, parts.start_time(slot)):
            raise FlowTableError(f"pid {dead_pid} is alive")
        phase = parts.phase(slot) if slot is not None else Phase.IDLE
        notes = [f"phase {phase.name}" if slot is not None else "not registered"]
        if lock.resetting() or phase in TRANSITIONAL:
            notes += _full_reset(parts, lock, store, own_slot, timeout)
        elif slot is not None and phase == Phase.R_HELD:
            lock.exit_reader_for(slot)
            notes.append("released its read lock")
        elif slot is not None and phase == Phase.W_HELD:
            notes += _repair_mutation(store, live_pids(parts, exclude=dead_pid).__contains__)
            lock.exit_writer_for(slot)
            notes.append("released its write lock")
        if slot is not None:
            parts.clear(slot)
        live = live_pids(parts, exclude=dead_pid).__contains__
        lock.acquire_write()
        try:
            cancelled = store.free_dead_progress(live)
            store.count_recovery()
        finally:
            lock.release_write()
        if cancelled:
            notes.append(f"cancelled {cancelled} in-progress allocation(s)")
        return f"pid {dead_pid}: " + "; ".join(notes)


def _repair_mutation(store: FlowStore, live: Callable[[int], bool]) -> list[str]:
    """Rebuild the table if the mutation record names a dead writer (exclusive access)."""
    pid, _op, _entry = store.mutation()
    if not pid or live(pid):
        return []
    return store.rebuild(live)


def _full_reset(parts: Participants, lock: RwLock, store: FlowStore, own_slot: int,
                timeout: float | None) -> list[str]:
    """Reset the lock exactly once every live participant is IDLE."""
    lock.begin_reset()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        busy = [parts.pid(slot) for slot in parts.occupied()
                if slot != own_slot and parts.phase(slot) != Phase.IDLE
                and process_alive(parts.pid(slot), parts.start_time(slot))]
        if not busy:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise FlowTableError(f"reset still waits for pids {busy}; call recover() again")
        time.sleep(SLICE)
    live = live_pids(parts)
    notes = _repair_mutation(store, live.__contains__)
    lock.reset_idle()
    cleared = []
    for slot in parts.occupied():
        if slot != own_slot and parts.pid(slot) not in live:
            cleared.append(parts.pid(slot))
            parts.clear(slot)
    lock.end_reset()
    notes.append("reset the lock" + (f", cleared dead pids {cleared}" if cleared else ""))
    return notes
