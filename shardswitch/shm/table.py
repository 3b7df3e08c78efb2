"""The shared flow table: one instance per switch, used by the coordinator and every worker.

Theory of operation
-------------------
The coordinator creates the instance (:meth:`FlowTable.create`: a memfd and
three semaphores no other process can open, see
:mod:`shardswitch.shm.segment`; header, free list) and closes it when it
stops (:meth:`FlowTable.close`); nothing of it outlives the processes that
hold it.  Workers are forked from the coordinator and register on the table
they inherited (:meth:`FlowTable.attach`).  Each process registers in a
participant slot and gets its own :class:`FlowTable` object; the object is
not thread-safe and not usable across ``fork`` (attach again in the child).

Creating a flow follows passt's life cycle, one allocation in progress per
process::

    ref = table.alloc()                      # write lock: FREE -> NEW
    table.set_initiator(ref, side)           # no lock:    NEW -> INI
    table.set_target(ref, side)              # no lock:    INI -> TGT
    table.set_type(ref, FlowType.UDP, pair)  # no lock:    TGT -> TYPED
    won = table.activate(ref, now)           # write lock: TYPED -> ACTIVE, both sides hashed
    if won != ref:                           # the same flow was activated by someone else
        table.cancel(ref)                    # write lock: back to FREE; use ``won``

The middle steps need no lock: an entry in NEW..TYPED belongs to the process
that allocated it (its pid is in the entry) and every traversal skips it, so
the process may open sockets between the steps without blocking anyone.

Lookups (:meth:`lookup`, :meth:`lookup_key`, :meth:`get`, :meth:`list_flows`,
:meth:`check`) take the read lock; mutations (:meth:`remove`,
:meth:`remove_many` - one lock for the batch -, :meth:`remove_owned_by`,
:meth:`set_owner`) the write lock.  :meth:`touch` takes no lock: only the
owner of a flow writes its activity time (an aligned 8-byte store).
References are :class:`FlowRef` ``(index, generation)``; every call taking
one checks the generation (freeing an entry increments it).

After a process died the coordinator calls :meth:`recover` (see
:mod:`shardswitch.shm.recovery`) and, for a dead worker, :meth:`remove_owned_by`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from types import TracebackType

from shardswitch.shm.layout import (DEFAULT_CAPACITY, DEFAULT_PARTICIPANTS, GUEST6_QWORD, GUEST6_SEQ_WORD,
                                    GUEST_MAC_KNOWN, GUEST_MAC_QWORD, SIDE,
                                    Flow, FlowRef,
                                    FlowSide, FlowTableError, FlowType, Geometry, HeaderWord, Hit,
                                    HookPoint,
                                    Phase, StaleReferenceError, State, check_side, pack_key)
from shardswitch.shm.recovery import dead_pids, recover
from shardswitch.shm.rwlock import SLICE, Hook, Participants, RwLock
from shardswitch.shm.segment import Segment, process_alive, process_start_time
from shardswitch.shm.store import FlowStore

_NEW, _INI, _TGT, _TYPED = State.NEW.value, State.INI.value, State.TGT.value, State.TYPED.value
_ACTIVE = State.ACTIVE.value
_KEY_SIZE = SIDE.size
#: Bytes of the guest's IPv6 address in the header, and how often a reader retries a write in progress.
GUEST6_LEN = 16
GUEST6_READ_TRIES = 1000


class FlowTable:
    """This process's handle on the shared flow table of one instance."""

    __slots__ = ("_segment", "_words", "_qwords", "_parts", "_lock", "_store", "_slot", "_pid",
                 "_pending", "_closed", "_hook", "capacity", "instance")

    def __init__(self, segment: Segment, slice_seconds: float) -> None:
        """Register this process on ``segment`` (use :meth:`create` or :meth:`attach`)."""
        geometry = segment.geometry
        view = memoryview(segment.mm)
        self._words = view[:geometry.entries_offset].cast("I")
        self._qwords = view[:geometry.entries_offset].cast("Q")
        view.release()
        self._segment = segment
        self._pid = os.getpid()
        self._parts = Participants(self._words, self._qwords, geometry.max_participants)
        try:
            with segment.registry_lock():
                self._slot = self._parts.claim(self._pid, process_start_time(self._pid) or 0,
                                               process_alive)
        except BaseException:
            self._words.release()
            self._qwords.release()
            raise
        segment.users += 1
        self._lock = RwLock(self._words, self._parts, self._slot,
                            (segment.turnstile, segment.room, segment.mutex), slice_seconds)
        self._store = FlowStore(segment.mm, geometry, segment.secret(), self._pid)
        self._pending: FlowRef | None = None
        self._closed = False
        self._hook: Hook | None = None
        self.capacity = geometry.capacity
        #: The instance's random id (status output; what forked children attach to).
        self.instance = segment.instance

    # -- instance life cycle ----------------------------------------------------------------------

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY, max_participants: int = DEFAULT_PARTICIPANTS,
               slice_seconds: float = SLICE) -> FlowTable:
        """Create a new instance (objects no other process can open) and register this process on it."""
        geometry = Geometry.for_capacity(capacity, max_participants)
        segment = Segment.create(geometry, os.urandom(16))
        segment.users += 1          # held while the table is initialised, whatever happens
        try:
            table = cls(segment, slice_seconds)
            try:
                table._store.initialise()
            except BaseException:
                table.close()
                raise
        finally:
            segment.release()
        return table

    @classmethod
    def attach(cls, instance: str, slice_seconds: float = SLICE) -> FlowTable:
        """Register this process on the table ``instance`` that it created or inherited by fork from its
        creator (there is no name to open: see :mod:`shardswitch.shm.segment`)."""
        return cls(Segment.inherited(instance), slice_seconds)

    @staticmethod
    def inherited_fds(instance: str) -> tuple[int, ...]:
        """The descriptors a forked process must keep open to use ``instance`` (() if "" or not held)."""
        return Segment.descriptors(instance) if instance else ()

    def close(self) -> None:
        """Cancel this process's allocation in progress, unregister, release the segment (the last handle of
        the creating process unmaps it and closes the memfd and semaphores)."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._pid:        # a forked child must not unregister its parent
            if self._pending is not None:
                self.cancel(self._pending)
            with self._segment.registry_lock():
                if self._parts.pid(self._slot) == self._pid and self._lock.phase() == Phase.IDLE:
                    self._parts.clear(self._slot)
        self._store.release()
        self._words.release()
        self._qwords.release()
        self._segment.release()

    def __enter__(self) -> FlowTable:
        """Use as a context manager: closed at exit."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close."""
        self.close()

    # -- flow creation ----------------------------------------------------------------------------

    def alloc(self) -> FlowRef:
        """Allocate an entry (NEW) for a flow this process creates; one at a time per process."""
        if self._pending is not None:
            raise FlowTableError(f"allocation {self._pending} still in progress")
        lock = self._lock
        lock.acquire_write()
        try:
            index = self._store.alloc()
        finally:
            lock.release_write()
        ref = self._pending = FlowRef(index, self._store.generation(index))
        return ref

    def _own(self, ref: FlowRef, state: int) -> int:
        """The index of this process's allocation ``ref``, which must be in ``state``."""
        if self._pending is None or tuple(ref) != self._pending:
            raise StaleReferenceError(f"{ref} is not this process's allocation in progress")
        index = ref.entry
        now = self._store.state(index)
        if now != state or self._store.generation(index) != ref.generation:
            raise FlowTableError(f"entry {index} is {State(now).name}, expected {State(state).name}")
        return index

    def set_initiator(self, ref: FlowRef, side: FlowSide) -> None:
        """Store the initiating side (NEW -> INI)."""
        check_side(side)
        index = self._own(ref, _NEW)
        self._store.write_side(index, 0, side)
        self._store.set_state(index, State.INI)

    def set_target(self, ref: FlowRef, side: FlowSide) -> None:
        """Store the target side (INI -> TGT)."""
        check_side(side)
        index = self._own(ref, _INI)
        self._store.write_side(index, 1, side)
        self._store.set_state(index, State.TGT)

    def set_type(self, ref: FlowRef, ftype: FlowType, owner: int) -> None:
        """Set the flow type and the owning queue pair (TGT -> TYPED)."""
        if ftype not in FlowType or ftype == FlowType.NONE:
            raise FlowTableError(f"bad flow type {ftype!r}")
        _check_owner(owner)
        index = self._own(ref, _TGT)
        self._store.set_type(index, ftype, owner)
        self._store.set_state(index, State.TYPED)

    def activate(self, ref: FlowRef, now: float | None = None) -> FlowRef:
        """Make the flow visible (TYPED -> ACTIVE) and return ``ref``; or return the flow
        that already holds one of its keys, in which case the caller must :meth:`cancel` ``ref``."""
        index = self._own(ref, _TYPED)
        when = time.monotonic() if now is None else now
        store, lock = self._store, self._lock
        lock.acquire_write()
        try:
            winner = store.activate(index, when)
            won = FlowRef(winner, store.generation(winner))
        finally:
            lock.release_write()
        if winner == index:
            self._pending = None
            return ref
        return won

    def enter(self, ftype: FlowType, initiator: FlowSide, target: FlowSide, owner: int,
              now: float | None = None) -> FlowRef | None:
        """A whole life cycle at once (NEW, INI, TGT, TYPED, ACTIVE): the new flow, or None when a twin won.

        A twin is a flow with one of the same keys that another process
        activated first; this allocation is then cancelled and the caller
        finds the twin with :meth:`lookup`.
        """
        ref = self.alloc()
        try:
            self.set_initiator(ref, initiator)
            self.set_target(ref, target)
            self.set_type(ref, ftype, owner)
            winner = self.activate(ref, now)
        except BaseException:
            self.cancel(ref)
            raise
        if winner != ref:
            self.cancel(ref)
            return None
        return ref

    def cancel(self, ref: FlowRef) -> None:
        """Abandon this process's allocation in progress (back to FREE)."""
        if self._pending is None or tuple(ref) != self._pending:
            raise StaleReferenceError(f"{ref} is not this process's allocation in progress")
        lock = self._lock
        lock.acquire_write()
        try:
            self._store.cancel(ref.entry)
        finally:
            lock.release_write()
        self._pending = None

    @property
    def pending(self) -> FlowRef | None:
        """This process's allocation in progress, if any."""
        return self._pending

    # -- lookups (read lock) ----------------------------------------------------------------------

    def lookup(self, ftype: FlowType, side: FlowSide) -> Hit | None:
        """The active flow of type ``ftype`` one of whose sides is ``side``."""
        return self.lookup_key(pack_key(ftype, side))

    def lookup_key(self, key: bytes) -> Hit | None:
        """The active flow one of whose sides has the packed ``key`` (see ``layout.pack_key``)."""
        if len(key) != _KEY_SIZE:
            raise FlowTableError(f"a key is {_KEY_SIZE} bytes, not {len(key)}")
        lock = self._lock
        lock.acquire_read()
        try:
            return self._store.hit(key)
        finally:
            lock.release_read()

    def get(self, ref: FlowRef) -> Flow | None:
        """The active flow ``ref`` names, or None if it is gone."""
        index = self._index(ref.entry)
        lock = self._lock
        lock.acquire_read()
        try:
            store = self._store
            if store.state(index) != _ACTIVE or store.generation(index) != ref.generation:
                return None
            return store.decode(index)
        finally:
            lock.release_read()

    def list_flows(self, owner: int | None = None) -> list[Flow]:
        """Every active flow (of queue pair ``owner`` if given); entries in progress are skipped."""
        lock = self._lock
        lock.acquire_read()
        try:
            if self._hook is not None:
                self._hook(HookPoint.READ_HELD)
            store = self._store
            return [store.decode(index) for index in store.active(owner)]
        finally:
            lock.release_read()

    # -- changes to active flows (write lock) -------------------------------------------------------

    def remove(self, ref: FlowRef) -> bool:
        """Remove the flow ``ref``; False if it was already gone (stale reference)."""
        return self.remove_many((ref,)) == 1

    def remove_many(self, refs: Iterable[FlowRef]) -> int:
        """Remove several flows under one write lock; returns how many were still there."""
        pairs = [(self._index(ref.entry), ref.generation) for ref in refs]
        store, lock = self._store, self._lock
        removed = 0
        lock.acquire_write()
        try:
            for index, generation in pairs:
                removed += store.remove(index, generation)
        finally:
            lock.release_write()
        return removed

    def remove_owned_by(self, owner: int) -> int:
        """Remove every flow of queue pair ``owner`` (its worker died); returns the count."""
        _check_owner(owner)
        store, lock = self._store, self._lock
        lock.acquire_write()
        try:
            return sum(store.remove(index, store.generation(index)) for index in store.active(owner))
        finally:
            lock.release_write()

    def set_owner(self, ref: FlowRef, owner: int) -> bool:
        """Move the flow ``ref`` to queue pair ``owner``; False if it is gone."""
        _check_owner(owner)
        index = self._index(ref.entry)
        lock = self._lock
        lock.acquire_write()
        try:
            return self._store.set_owner(index, ref.generation, owner)
        finally:
            lock.release_write()

    def touch(self, index: int, now: float) -> None:
        """Record activity on entry ``index`` (no lock: call only for flows this process owns)."""
        if not 0 <= index < self.capacity:
            raise FlowTableError(f"entry {index} outside 0..{self.capacity - 1}")
        self._store.touch(index, now)

    def publish_timeout(self, index: int, seconds: int) -> None:
        """Record the idle timeout entry ``index`` is under, for ``shardswitch flows`` (no lock: call only for
        flows this process owns)."""
        if not 0 <= index < self.capacity:
            raise FlowTableError(f"entry {index} outside 0..{self.capacity - 1}")
        if not isinstance(seconds, int) or not 0 <= seconds <= 0xFFFFFFFF:
            raise FlowTableError(f"bad timeout {seconds!r}")
        self._store.set_timeout(index, seconds)

    def _index(self, index: int) -> int:
        """``index`` if it names an entry of this table."""
        if not isinstance(index, int) or not 0 <= index < self.capacity:
            raise FlowTableError(f"entry {index!r} outside 0..{self.capacity - 1}")
        return index

    # -- maintenance ------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Verify every invariant of the table and the lock; returns the problems (empty = sound)."""
        lock = self._lock
        lock.acquire_read()
        try:
            if self._hook is not None:
                self._hook(HookPoint.READ_HELD)
            problems = self._store.check()
            readers = self._words[HeaderWord.READERS]
            if readers < 1:
                problems.append(f"reader count {readers} while this process reads")
        finally:
            lock.release_read()
        return problems

    def publish_guest_mac(self, mac: bytes) -> None:
        """Record the guest's MAC for every worker (no lock: one aligned 8-byte store)."""
        self._qwords[GUEST_MAC_QWORD] = GUEST_MAC_KNOWN | int.from_bytes(mac, "big")

    def guest_mac(self) -> bytes | None:
        """The guest's MAC as some worker learnt it, or None."""
        value = self._qwords[GUEST_MAC_QWORD]
        return (value & 0xFFFF_FFFF_FFFF).to_bytes(6, "big") if value & GUEST_MAC_KNOWN else None

    def publish_guest6(self, addr: bytes) -> None:
        """Record the guest's global IPv6 address (16 bytes) for every worker.

        Rare (when the address changes): under the write lock, so that the
        sequence lock of the header has a single writer.
        """
        if len(addr) != GUEST6_LEN:
            raise ValueError(f"an IPv6 address is {GUEST6_LEN} bytes, not {len(addr)}")
        words, qwords = self._words, self._qwords
        lock = self._lock
        lock.acquire_write()
        try:
            words[GUEST6_SEQ_WORD] = (words[GUEST6_SEQ_WORD] | 1) & 0xFFFF_FFFF
            qwords[GUEST6_QWORD] = int.from_bytes(addr[:8], "little")
            qwords[GUEST6_QWORD + 1] = int.from_bytes(addr[8:], "little")
            words[GUEST6_SEQ_WORD] = (words[GUEST6_SEQ_WORD] + 1) & 0xFFFF_FFFF or 2
        finally:
            lock.release_write()

    def guest6(self) -> bytes | None:
        """The guest's global IPv6 address as some worker last published it, or None (no lock: a
        sequence-lock read, None too when a writer stays in the middle of its store)."""
        words, qwords = self._words, self._qwords
        for _ in range(GUEST6_READ_TRIES):
            before = words[GUEST6_SEQ_WORD]
            if before == 0:
                return None
            if before & 1:
                continue
            addr = (qwords[GUEST6_QWORD].to_bytes(8, "little")
                    + qwords[GUEST6_QWORD + 1].to_bytes(8, "little"))
            if words[GUEST6_SEQ_WORD] == before:
                return addr
        return None

    def counters(self) -> dict[str, int]:
        """Entry counts and statistics from the header (no lock: a snapshot)."""
        return self._store.counters()

    def lock_state(self) -> dict[str, object]:
        """The lock's shared bookkeeping (no lock: a snapshot, for status output and tests)."""
        words, parts = self._words, self._parts
        return {"readers": words[HeaderWord.READERS], "writer_pid": words[HeaderWord.WRITER_PID],
                "epoch": words[HeaderWord.EPOCH], "semaphores": self._lock.semaphore_values(),
                "participants": {parts.pid(slot): parts.phase(slot).name for slot in parts.occupied()},
                "mutation_pid": self._store.mutation()[0]}

    def recover(self, dead_pid: int, timeout: float | None = None) -> str:
        """Release what the dead process ``dead_pid`` held and repair the table; says what was done."""
        return recover(self._segment, self._parts, self._lock, self._store, self._slot, dead_pid,
                       timeout)

    def dead_participants(self) -> list[int]:
        """Pids of registered processes that died (candidates for :meth:`recover`)."""
        return dead_pids(self._parts)

    def set_hook(self, hook: Hook | None) -> None:
        """Install a test-only hook called at each :class:`HookPoint` (None removes it)."""
        self._hook = hook
        self._lock.hook = hook
        self._store.hook = hook


def _check_owner(owner: int) -> None:
    """Refuse an owner that is not a queue pair number (u16)."""
    if not isinstance(owner, int) or not 0 <= owner <= 0xFFFF:
        raise FlowTableError(f"bad owner queue pair {owner!r}")
