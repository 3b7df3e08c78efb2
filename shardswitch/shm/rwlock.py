"""A crash-recoverable readers-writer lock across processes, from three POSIX semaphores.

Theory of operation
-------------------
The lock is the "no-starve readers-writers" construction (A. Downey, *The
Little Book of Semaphores*, 4.2.6) over three named semaphores, all
initially 1, and a reader count kept in the segment header::

    reader enter:  turnstile.wait; turnstile.post
                   mutex.wait; readers += 1; if readers == 1: room.wait; mutex.post
    reader exit:   mutex.wait; readers -= 1; if readers == 0: room.post; mutex.post
    writer enter:  turnstile.wait; room.wait
    writer exit:   turnstile.post; room.post

A waiting writer holds the turnstile, so readers arriving after it queue
behind it (writers are not starved); a writer lets the turnstile go when it
leaves, so queued readers get in before the next writer can take the room
again (readers are not starved either, to the extent that the kernel's
semaphore wake-ups are fair - Linux futexes wake waiters roughly in order but
let a newcomer barge in).

Holder bookkeeping
------------------
Every process using the lock owns a participant slot in the segment (pid,
start time, :class:`~shardswitch.shm.layout.Phase`).  The phase is written
before the first and after the last semaphore operation of each step, so:

* IDLE: holds nothing; R_HELD: counted in ``readers`` and nothing else;
  W_HELD: holds the turnstile and the room.  A process that dies in one of
  these can be released exactly on its behalf (:meth:`RwLock.exit_reader_for`,
  :meth:`RwLock.exit_writer_for`).
* R_WAIT, R_EXIT, W_WAIT, W_EXIT are transitional: the process was inside
  a semaphore operation or between one and the bookkeeping, and what it holds
  is ambiguous.  Only a full reset repairs that.

Full reset (driven by the recovering process, see :mod:`shardswitch.shm.recovery`):
the recoverer makes the header's epoch odd (:meth:`RwLock.begin_reset`).  Every
blocking wait here is a sequence of ``acquire(timeout=SLICE)``; after each
timeout the waiter looks at the epoch and, if it is odd, abandons its attempt:
it undoes exactly what it took (it knows: it is its own local state), goes
IDLE and sleeps until the epoch is even again, then starts over.  Entering the
lock also waits while the epoch is odd.  Writing the phase and then reading
the epoch (entrant), against writing the epoch and then reading the phases
(recoverer), each with a full fence in between, guarantees that the
recoverer either sees the entrant's non-IDLE phase or the entrant sees the odd
epoch.  Processes already inside (R_HELD/W_HELD) finish normally.  Once every
live slot is IDLE the recoverer sets the semaphores to 1 and the counters to
0 (:meth:`RwLock.reset_idle`) and ends the epoch (:meth:`RwLock.end_reset`).

Cost (2-core test machine, CPython 3.11, uncontended, bench/flowtable.py): a
posix_ipc semaphore ``acquire(timeout)``+``release`` is about 100 ns, the fence
about 80 ns; a whole read acquire+release (eight semaphore operations) about
1.0 us, a write acquire+release (four) about 0.6 us.  A lock object belongs to
one process and is not thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import posix_ipc

from shardswitch.shm.layout import (HEADER_SIZE, PART_START_QWORD, FlowTableError, HeaderWord,
                                    HookPoint, PartWord, Phase)
from shardswitch.virtio.barrier import fence

#: Length of one wait slice in seconds: how quickly a waiter notices a reset.
SLICE = 0.02
#: u32 word of the first participant slot.
_PART_BASE = HEADER_SIZE // 4
_EPOCH = HeaderWord.EPOCH.value
_READERS = HeaderWord.READERS.value
_WRITER = HeaderWord.WRITER_PID.value
_IDLE, _R_WAIT, _R_HELD = Phase.IDLE.value, Phase.R_WAIT.value, Phase.R_HELD.value
_R_EXIT = Phase.R_EXIT.value
_W_WAIT, _W_HELD, _W_EXIT = Phase.W_WAIT.value, Phase.W_HELD.value, Phase.W_EXIT.value
_NOT_NOW = (posix_ipc.BusyError, posix_ipc.SignalError)

#: A test-only hook called at the points of :class:`HookPoint`.
Hook = Callable[[HookPoint], None]


class _Recovering(Exception):
    """A full reset began while this process was waiting: abandon the attempt."""


class Participants:
    """The participant slots of the segment: who uses the lock and in which phase."""

    __slots__ = ("_w", "_q", "count")

    def __init__(self, words: memoryview, qwords: memoryview, count: int) -> None:
        """Use the u32/u64 casts ``words``/``qwords`` of the segment, which has ``count`` slots."""
        self._w = words
        self._q = qwords
        self.count = count

    def _word(self, slot: int, field: PartWord) -> int:
        """The u32 word index of ``field`` of ``slot``."""
        return _PART_BASE + slot * PartWord.WORDS + field

    def pid(self, slot: int) -> int:
        """The pid registered in ``slot`` (0 = free)."""
        return self._w[self._word(slot, PartWord.PID)]

    def phase(self, slot: int) -> Phase:
        """The lock phase of ``slot``."""
        value = self._w[self._word(slot, PartWord.PHASE)]
        try:
            return Phase(value)
        except ValueError:
            raise FlowTableError(f"participant slot {slot} has invalid phase {value}") from None

    def set_phase(self, slot: int, phase: Phase) -> None:
        """Set the lock phase of ``slot``."""
        self._w[self._word(slot, PartWord.PHASE)] = phase

    def start_time(self, slot: int) -> int:
        """The start time recorded for the process in ``slot``."""
        return self._q[(_PART_BASE + slot * PartWord.WORDS) // 2 + PART_START_QWORD]

    def phase_word(self, slot: int) -> int:
        """The u32 word index of the phase of ``slot`` (for the lock's hot path)."""
        return self._word(slot, PartWord.PHASE)

    def find(self, pid: int) -> int | None:
        """The slot registered to ``pid``, if any."""
        for slot in range(self.count):
            if self.pid(slot) == pid:
                return slot
        return None

    def claim(self, pid: int, start_time: int, alive: Callable[[int, int], bool]) -> int:
        """Register ``pid`` in a free slot (or an IDLE one left by a dead process); registry lock held."""
        for slot in range(self.count):
            other = self.pid(slot)
            if other == 0 or (self.phase(slot) == Phase.IDLE and not alive(other, self.start_time(slot))):
                self._q[(_PART_BASE + slot * PartWord.WORDS) // 2 + PART_START_QWORD] = start_time
                self.set_phase(slot, Phase.IDLE)
                self._w[self._word(slot, PartWord.PID)] = pid
                return slot
        raise FlowTableError(f"all {self.count} participant slots are in use")

    def clear(self, slot: int) -> None:
        """Free ``slot``; registry lock held."""
        self._w[self._word(slot, PartWord.PID)] = 0
        self.set_phase(slot, Phase.IDLE)
        self._q[(_PART_BASE + slot * PartWord.WORDS) // 2 + PART_START_QWORD] = 0

    def occupied(self) -> list[int]:
        """The slots that have a pid."""
        return [slot for slot in range(self.count) if self.pid(slot)]


class RwLock:
    """This process's side of the shared readers-writer lock (one per process, not thread-safe)."""

    __slots__ = ("_w", "_turnstile", "_room", "_mutex", "_phase", "_pid", "_slice", "_parts", "hook")

    def __init__(self, words: memoryview, parts: Participants, slot: int,
                 sems: tuple[posix_ipc.Semaphore, posix_ipc.Semaphore, posix_ipc.Semaphore],
                 slice_seconds: float = SLICE) -> None:
        """Lock for the process in participant ``slot``; ``sems`` = turnstile, room, mutex."""
        self._w = words
        self._parts = parts
        self._turnstile, self._room, self._mutex = sems
        self._phase = parts.phase_word(slot)
        self._pid = parts.pid(slot)
        self._slice = slice_seconds
        self.hook: Hook | None = None

    # -- waiting ------------------------------------------------------------------------------

    def _take(self, sem: posix_ipc.Semaphore) -> None:
        """Acquire ``sem`` in time slices; raise _Recovering if a reset starts meanwhile."""
        while True:
            try:
                sem.acquire(self._slice)
                return
            except _NOT_NOW:
                if self._w[_EPOCH] & 1:
                    raise _Recovering from None

    def _announce(self, phase: int) -> bool:
        """Enter ``phase``; False if a reset is under way (the caller must back off)."""
        self._w[self._phase] = phase
        fence()
        return not self._w[_EPOCH] & 1

    def _back_off(self) -> None:
        """Go IDLE and sleep until the current reset (if any) has ended."""
        w = self._w
        w[self._phase] = _IDLE
        while w[_EPOCH] & 1:
            time.sleep(self._slice)

    # -- readers ------------------------------------------------------------------------------

    def acquire_read(self) -> None:
        """Enter as a reader (blocks while a writer is inside or waiting)."""
        while True:
            if self._announce(_R_WAIT):
                try:
                    self._enter_read()
                    self._w[self._phase] = _R_HELD
                    return
                except _Recovering:
                    pass
            self._back_off()

    def _enter_read(self) -> None:
        """The reader's entry protocol; undoes itself before raising _Recovering."""
        w = self._w
        self._take(self._turnstile)
        self._turnstile.release()
        self._take(self._mutex)
        try:
            readers = w[_READERS] + 1
            w[_READERS] = readers
            if readers == 1:
                try:
                    self._take(self._room)
                except _Recovering:
                    w[_READERS] = readers - 1
                    raise
            if self.hook is not None:
                self.hook(HookPoint.READ_COUNTED)
        finally:
            self._mutex.release()

    def release_read(self) -> None:
        """Leave as a reader."""
        w = self._w
        w[self._phase] = _R_EXIT
        try:
            self._take(self._mutex)
        except _Recovering:
            w[self._phase] = _IDLE      # the reset restores the count and the room
            return
        self._leave_readers()
        w[self._phase] = _IDLE

    def _leave_readers(self) -> None:
        """With the count mutex held: uncount one reader, free the room after the last; drop the mutex."""
        w = self._w
        try:
            readers = w[_READERS]
            if readers:                 # 0 would be a corrupt count: never over-post the room
                w[_READERS] = readers - 1
                if readers == 1:
                    self._room.release()
        finally:
            self._mutex.release()

    # -- writers ------------------------------------------------------------------------------

    def acquire_write(self) -> None:
        """Enter as the writer (waits for the readers inside to leave)."""
        while True:
            if self._announce(_W_WAIT):
                try:
                    self._take(self._turnstile)
                    try:
                        if self.hook is not None:
                            self.hook(HookPoint.WRITE_TURNSTILE)
                        self._take(self._room)
                    except _Recovering:
                        self._turnstile.release()
                        raise
                    self._w[_WRITER] = self._pid
                    self._w[self._phase] = _W_HELD
                    return
                except _Recovering:
                    pass
            self._back_off()

    def release_write(self) -> None:
        """Leave as the writer."""
        w = self._w
        w[self._phase] = _W_EXIT
        w[_WRITER] = 0
        self._turnstile.release()
        self._room.release()
        w[self._phase] = _IDLE

    def phase(self) -> Phase:
        """This process's current phase."""
        return Phase(self._w[self._phase])

    # -- recovery (called by the recovering process, registry lock held) ------------------------

    def exit_reader_for(self, slot: int) -> None:
        """Run the reader exit on behalf of the dead process in ``slot`` (phase R_HELD)."""
        parts = self._parts
        parts.set_phase(slot, Phase.R_EXIT)     # if we die here, the next recovery resets
        self._take(self._mutex)
        self._leave_readers()
        parts.set_phase(slot, Phase.IDLE)

    def exit_writer_for(self, slot: int) -> None:
        """Run the writer exit on behalf of the dead process in ``slot`` (phase W_HELD)."""
        parts = self._parts
        parts.set_phase(slot, Phase.W_EXIT)
        self._w[_WRITER] = 0
        self._turnstile.release()
        self._room.release()
        parts.set_phase(slot, Phase.IDLE)

    def begin_reset(self) -> None:
        """Make the epoch odd: waiters abandon and new entrants wait."""
        w = self._w
        w[HeaderWord.RECOVERER_PID] = self._pid
        if not w[_EPOCH] & 1:
            w[_EPOCH] = (w[_EPOCH] + 1) & 0xFFFFFFFF
        fence()

    def reset_idle(self) -> None:
        """Set the semaphores to 1 and the lock counters to 0 (every live participant is IDLE)."""
        for sem in (self._turnstile, self._room, self._mutex):
            while True:
                try:
                    sem.acquire(0)
                except posix_ipc.BusyError:
                    break
            sem.release()
        self._w[_READERS] = 0
        self._w[_WRITER] = 0

    def end_reset(self) -> None:
        """Make the epoch even again: waiters go on."""
        w = self._w
        fence()
        w[_EPOCH] = (w[_EPOCH] + 1) & 0xFFFFFFFF
        w[HeaderWord.RECOVERER_PID] = 0

    def resetting(self) -> bool:
        """Whether a full reset is under way (the epoch is odd)."""
        return bool(self._w[_EPOCH] & 1)

    def semaphore_values(self) -> tuple[int, int, int]:
        """Current values of turnstile, room and mutex (for diagnostics)."""
        return (self._turnstile.value, self._room.value, self._mutex.value)
