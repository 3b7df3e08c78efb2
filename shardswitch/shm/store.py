"""The flow table's data structure in the mapped segment: entries, hash index, free list.

Theory of operation
-------------------
:class:`FlowStore` reads and writes the segment laid out in
:mod:`shardswitch.shm.layout` through ``memoryview`` casts (u8/u16/u32/f64
over the entries, u32 over the index and the header).  It takes no lock:
:class:`~shardswitch.shm.table.FlowTable` calls the mutating methods with the
write lock held, the reading ones with (at least) the read lock held, and
the in-progress setters (``write_side``, ``set_state``, ``set_type``) without
a lock, because an entry in NEW..TYPED belongs to the process that allocated
it and every traversal skips such entries.

Hash index: open addressing with linear probing over ``index_size`` u32
buckets (about 1.4 x twice the capacity, as passt), each holding
``sidx + 1`` (0 = empty) with ``sidx = entry * 2 + side``.  Both sides of an
ACTIVE flow are in the index, so a flow is found from the guest tuple and
from the host tuple.  A side's key is its 38 stored bytes (pif, type, ports,
addresses); its home bucket is a keyed BLAKE2b of the key (8-byte digest,
per-instance 16-byte secret from the header, so every process computes the
same bucket and a guest cannot aim collisions) modulo the index size.  The
home bucket is also stored in the entry: probes compare it before the key,
and deletion (backward shift, no tombstones) needs it for the entries it
moves.  Measured per hash on the test machine: ``blake2b`` with a fresh keyed
object 550 ns, ``copy()`` of a pre-keyed object + ``update`` 390 ns (used),
``blake2s`` 475 ns; ``zlib.crc32`` would be 90 ns but is linear, so a guest
could produce colliding keys at will.

Free list: singly linked through ``next_free`` from ``free_head``; a freed
entry is pushed at the head, allocation pops the head.  Freeing increments
the entry's generation, so a reference taken before is recognised as stale.
Unlike passt there are no clusters, hence no merging: a rebuild links FREE
entries only (in ascending order), so it never spans entries in NEW..TYPED.

Mutation record: every mutation writes (op, entry) and then the writer's pid
into the header before touching anything and clears the pid when done.  A
writer that dies in between leaves the record; :meth:`FlowStore.rebuild`
then discards the entry named there, frees in-progress entries of dead
allocators, and rebuilds the index, the free list and the counters from the
entries.  ``check`` verifies every invariant without changing anything.
"""

from __future__ import annotations

import hashlib
import mmap
from array import array
from collections.abc import Callable, Iterable

from shardswitch.shm.layout import (ENTRY_SIZE, ENTRY_WORDS, HEADER_SIZE, LAST_ACTIVITY_DWORD,
                                    NO_ENTRY, OWNER_HWORD, SIDE, EntryByte, EntryWord, Flow,
                                    FlowSide, FlowTableError, Geometry, HeaderWord, Hit, HookPoint,
                                    MutationOp, Pif, State, StatWord, TableFullError, decode_entry)

#: A test-only hook called at the points of :class:`HookPoint`.
Hook = Callable[[HookPoint], None]

# Hot-path constants as plain ints (enum member access costs an attribute lookup each time).
_FREE, _NEW, _TYPED, _ACTIVE = State.FREE.value, State.NEW.value, State.TYPED.value, State.ACTIVE.value
_GEN, _NEXT, _APID, _HOME = (EntryWord.GENERATION.value, EntryWord.NEXT_FREE.value,
                             EntryWord.ALLOC_PID.value, EntryWord.HOME0.value)
_TIMEOUT = EntryWord.TIMEOUT.value
_SIDE0, _SIDE_SIZE = EntryByte.SIDE0.value, SIDE.size
_HW_OWNER, _DW_LAST = OWNER_HWORD, LAST_ACTIVITY_DWORD
_H_FREE_HEAD, _H_N_FREE = HeaderWord.FREE_HEAD.value, HeaderWord.N_FREE.value
_H_N_PROGRESS, _H_N_ACTIVE = HeaderWord.N_PROGRESS.value, HeaderWord.N_ACTIVE.value
_H_MUT_PID, _H_MUT_OP, _H_MUT_ENTRY = (HeaderWord.MUT_PID.value, HeaderWord.MUT_OP.value,
                                       HeaderWord.MUT_ENTRY.value)
_HWORDS, _DWORDS = ENTRY_SIZE // 2, ENTRY_SIZE // 8
#: Zeros for the part of an entry cleared on allocation (sides and timeout).
_ZERO_SIDES = bytes(2 * SIDE.size + 4)


def _selector(states: Iterable[int]) -> bytes:
    """A ``bytes.translate`` table mapping the given state bytes to 1 and all others to 0."""
    wanted = set(states)
    return bytes(1 if value in wanted else 0 for value in range(256))


_SELECT_FREE = _selector([_FREE])
_SELECT_ACTIVE = _selector([_ACTIVE])
_SELECT_PROGRESS = _selector(range(_NEW, _TYPED + 1))


def _positions(states: bytes, selector: bytes) -> list[int]:
    """Indices of the entries whose state byte ``selector`` maps to 1."""
    marks = states.translate(selector)
    found: list[int] = []
    pos = marks.find(1)
    while pos >= 0:
        found.append(pos)
        pos = marks.find(1, pos + 1)
    return found


def _op_name(op: int) -> str:
    """The name of mutation op ``op`` (or its number if unknown)."""
    try:
        return MutationOp(op).name.lower()
    except ValueError:
        return f"op {op}"


class FlowStore:
    """Entries, hash index and free list of one mapped segment (no locking: see module doc)."""

    __slots__ = ("_mm", "_h32", "_h64", "_e8", "_e16", "_e32", "_ef", "_idx", "_ibytes", "_eoff",
                 "capacity", "index_size", "_hasher", "_pid", "hook")

    def __init__(self, mm: mmap.mmap, geometry: Geometry, secret: bytes, pid: int) -> None:
        """Views on ``mm`` laid out as ``geometry``; ``pid`` marks this process's mutations."""
        view = memoryview(mm)
        self._mm = mm
        self._h32 = view[:HEADER_SIZE].cast("I")
        self._h64 = view[:HEADER_SIZE].cast("Q")
        self._e8 = view[geometry.entries_offset:geometry.index_offset]
        self._e16 = self._e8.cast("H")
        self._e32 = self._e8.cast("I")
        self._ef = self._e8.cast("d")
        self._ibytes = view[geometry.index_offset:geometry.index_offset + 4 * geometry.index_size]
        self._idx = self._ibytes.cast("I")
        view.release()
        self._eoff = geometry.entries_offset
        self.capacity = geometry.capacity
        self.index_size = geometry.index_size
        self._hasher = hashlib.blake2b(digest_size=8, key=secret)
        self._pid = pid
        self.hook: Hook | None = None

    def release(self) -> None:
        """Release every view (required before the mapping can be closed)."""
        for view in (self._h32, self._h64, self._e16, self._e32, self._ef, self._e8, self._idx,
                     self._ibytes):
            view.release()

    def initialise(self) -> None:
        """Set up a freshly created (zero-filled) segment: every entry FREE and on the free list."""
        cap = self.capacity
        links = array("I", range(1, cap + 1))
        links[cap - 1] = NO_ENTRY
        self._e32[_NEXT::ENTRY_WORDS] = memoryview(links)
        h = self._h32
        h[_H_FREE_HEAD] = 0
        h[_H_N_FREE] = cap
        h[_H_N_PROGRESS] = h[_H_N_ACTIVE] = 0
        self._unmark()

    # -- keys and the hash index --------------------------------------------------------------

    def bucket(self, key: bytes) -> int:
        """The home bucket of ``key`` (identical in every process of the instance)."""
        h = self._hasher.copy()
        h.update(key)
        return int.from_bytes(h.digest(), "little") % self.index_size

    def key_of(self, index: int, side: int) -> bytes:
        """The stored key of ``side`` of entry ``index``."""
        start = self._eoff + index * ENTRY_SIZE + _SIDE0 + side * _SIDE_SIZE
        return self._mm[start:start + _SIDE_SIZE]

    def find(self, key: bytes, bucket: int) -> int:
        """The sidx whose key is ``key`` (home ``bucket``), or -1."""
        idx, e32, n = self._idx, self._e32, self.index_size
        i = bucket
        while True:
            value = idx[i]
            if not value:
                return -1
            sidx = value - 1
            entry, side = sidx >> 1, sidx & 1
            if e32[entry * ENTRY_WORDS + _HOME + side] == bucket and self.key_of(entry, side) == key:
                return sidx
            i += 1
            if i == n:
                i = 0

    def _insert(self, sidx: int, bucket: int) -> None:
        """Put ``sidx`` in the first empty bucket from ``bucket`` on."""
        idx, n = self._idx, self.index_size
        i = bucket
        while idx[i]:
            i += 1
            if i == n:
                i = 0
        idx[i] = sidx + 1

    def _delete(self, sidx: int, bucket: int) -> None:
        """Take ``sidx`` out of the index, shifting later members of its cluster back."""
        idx, e32, n = self._idx, self._e32, self.index_size
        target = sidx + 1
        i = bucket
        while idx[i] != target:
            if not idx[i]:
                raise FlowTableError(f"sidx {sidx} missing from the hash index")
            i += 1
            if i == n:
                i = 0
        j = i
        while True:
            j += 1
            if j == n:
                j = 0
            value = idx[j]
            if not value:
                break
            moved = value - 1
            home = e32[(moved >> 1) * ENTRY_WORDS + _HOME + (moved & 1)]
            # The member at j may fill the hole at i unless its home lies cyclically in (i, j].
            if (i < home <= j) if i <= j else (home > i or home <= j):
                continue
            idx[i] = value
            i = j
        idx[i] = 0

    # -- mutation record ------------------------------------------------------------------------

    def _mark(self, op: MutationOp, index: int) -> None:
        """Record that this process starts mutation ``op`` on entry ``index``."""
        h = self._h32
        h[_H_MUT_OP] = op
        h[_H_MUT_ENTRY] = index
        h[_H_MUT_PID] = self._pid

    def _unmark(self) -> None:
        """Record that the mutation is complete."""
        h = self._h32
        h[_H_MUT_PID] = 0
        h[_H_MUT_OP] = MutationOp.NONE
        h[_H_MUT_ENTRY] = NO_ENTRY

    def mutation(self) -> tuple[int, int, int]:
        """The mutation record: (pid, op, entry); pid 0 when none is in progress."""
        h = self._h32
        return h[_H_MUT_PID], h[_H_MUT_OP], h[_H_MUT_ENTRY]

    # -- entry fields -------------------------------------------------------------------------

    def state(self, index: int) -> int:
        """The state byte of entry ``index``."""
        return self._e8[index * ENTRY_SIZE]

    def generation(self, index: int) -> int:
        """The generation of entry ``index``."""
        return self._e32[index * ENTRY_WORDS + _GEN]

    def allocator(self, index: int) -> int:
        """The pid that allocated entry ``index`` (0 once active or free)."""
        return self._e32[index * ENTRY_WORDS + _APID]

    def set_state(self, index: int, state: State) -> None:
        """Set the state byte (in-progress transitions of the allocating process)."""
        self._e8[index * ENTRY_SIZE] = state

    def write_side(self, index: int, side: int, value: FlowSide) -> None:
        """Store ``side`` of in-progress entry ``index`` (its type byte is set by :meth:`set_type`)."""
        SIDE.pack_into(self._e8, index * ENTRY_SIZE + _SIDE0 + side * _SIDE_SIZE, value.pif, 0,
                       value.ep_port, value.our_port, value.ep_addr, value.our_addr)

    def set_type(self, index: int, ftype: int, owner: int) -> None:
        """Set type (also in both sides' keys) and owner of in-progress entry ``index``."""
        e8, off = self._e8, index * ENTRY_SIZE
        e8[off + EntryByte.TYPE] = ftype
        e8[off + _SIDE0 + 1] = ftype
        e8[off + _SIDE0 + _SIDE_SIZE + 1] = ftype
        self._e16[index * _HWORDS + _HW_OWNER] = owner

    def touch(self, index: int, now: float) -> None:
        """Set the last activity time of entry ``index``."""
        self._ef[index * _DWORDS + _DW_LAST] = now

    def set_timeout(self, index: int, seconds: int) -> None:
        """Set the idle timeout published for entry ``index``."""
        self._e32[index * ENTRY_WORDS + _TIMEOUT] = seconds

    def decode(self, index: int) -> Flow:
        """Entry ``index`` as a :class:`Flow`."""
        return decode_entry(self._e8, index * ENTRY_SIZE, index)

    # -- mutations (write lock held) ----------------------------------------------------------

    def alloc(self) -> int:
        """Take the first entry of the free list into state NEW for this process."""
        h, e32 = self._h32, self._e32
        index = h[_H_FREE_HEAD]
        if index == NO_ENTRY:
            raise TableFullError(f"all {self.capacity} flow entries are in use")
        if index >= self.capacity or self._e8[index * ENTRY_SIZE] != _FREE:
            raise FlowTableError(f"corrupt free list head {index}")
        self._mark(MutationOp.ALLOC, index)
        words, off = index * ENTRY_WORDS, index * ENTRY_SIZE
        h[_H_FREE_HEAD] = e32[words + _NEXT]
        self._e8[off + _SIDE0:off + _SIDE0 + len(_ZERO_SIDES)] = _ZERO_SIDES
        self._e8[off + EntryByte.TYPE] = 0
        self._e16[index * _HWORDS + _HW_OWNER] = 0
        e32[words + _NEXT] = NO_ENTRY
        e32[words + _APID] = self._pid
        self._e8[off] = _NEW
        h[_H_N_FREE] -= 1
        h[_H_N_PROGRESS] += 1
        self._h64[StatWord.ALLOCS] += 1
        self._unmark()
        return index

    def _push_free(self, index: int) -> None:
        """Make entry ``index`` FREE, bump its generation, push it on the free list."""
        h, e32, words = self._h32, self._e32, index * ENTRY_WORDS
        self._e8[index * ENTRY_SIZE] = _FREE
        e32[words + _GEN] = (e32[words + _GEN] + 1) & 0xFFFFFFFF
        e32[words + _APID] = 0
        e32[words + _NEXT] = h[_H_FREE_HEAD]
        h[_H_FREE_HEAD] = index
        h[_H_N_FREE] += 1

    def cancel(self, index: int) -> None:
        """Return in-progress entry ``index`` to the free list."""
        if not _NEW <= self._e8[index * ENTRY_SIZE] <= _TYPED:
            raise FlowTableError(f"entry {index} is not in progress")
        self._mark(MutationOp.CANCEL, index)
        self._push_free(index)
        self._h32[_H_N_PROGRESS] -= 1
        self._h64[StatWord.CANCELS] += 1
        self._unmark()

    def activate(self, index: int, now: float) -> int:
        """Insert TYPED entry ``index`` under both keys; returns it, or the entry already holding a key."""
        key0, key1 = self.key_of(index, 0), self.key_of(index, 1)
        if key0 == key1:
            raise FlowTableError(f"entry {index}: both sides have the same key")
        home0, home1 = self.bucket(key0), self.bucket(key1)
        for key, home in ((key0, home0), (key1, home1)):
            found = self.find(key, home)
            if found >= 0:
                self._h64[StatWord.DUPLICATES] += 1
                return found >> 1
        self._mark(MutationOp.ACTIVATE, index)
        words = index * ENTRY_WORDS
        self._e32[words + _HOME] = home0
        self._e32[words + _HOME + 1] = home1
        self._insert(2 * index, home0)
        if self.hook is not None:
            self.hook(HookPoint.ACTIVATE_HALF)
        self._insert(2 * index + 1, home1)
        self._ef[index * _DWORDS + _DW_LAST] = now
        self._e32[words + _APID] = 0
        self._e8[index * ENTRY_SIZE] = _ACTIVE
        h = self._h32
        h[_H_N_PROGRESS] -= 1
        h[_H_N_ACTIVE] += 1
        self._h64[StatWord.ACTIVATIONS] += 1
        self._unmark()
        return index

    def remove(self, index: int, generation: int) -> bool:
        """Remove ACTIVE entry ``index`` if its generation is ``generation``; False otherwise."""
        words = index * ENTRY_WORDS
        e32 = self._e32
        if self._e8[index * ENTRY_SIZE] != _ACTIVE or e32[words + _GEN] != generation:
            return False
        self._mark(MutationOp.REMOVE, index)
        self._delete(2 * index, e32[words + _HOME])
        if self.hook is not None:
            self.hook(HookPoint.REMOVE_HALF)
        self._delete(2 * index + 1, e32[words + _HOME + 1])
        self._push_free(index)
        self._h32[_H_N_ACTIVE] -= 1
        self._h64[StatWord.REMOVALS] += 1
        self._unmark()
        return True

    def set_owner(self, index: int, generation: int, owner: int) -> bool:
        """Give ACTIVE entry ``index`` (of ``generation``) to queue pair ``owner``; False if stale."""
        if self._e8[index * ENTRY_SIZE] != _ACTIVE or self.generation(index) != generation:
            return False
        self._e16[index * _HWORDS + _HW_OWNER] = owner
        return True

    # -- reading (read lock held) ---------------------------------------------------------------

    def hit(self, key: bytes) -> Hit | None:
        """The flow one of whose sides has ``key``."""
        sidx = self.find(key, self.bucket(key))
        if sidx < 0:
            return None
        index = sidx >> 1
        return Hit(index, self._e32[index * ENTRY_WORDS + _GEN], sidx & 1,
                   self._e16[index * _HWORDS + _HW_OWNER])

    def _states(self) -> bytes:
        """The state byte of every entry, in entry order."""
        return self._e8[::ENTRY_SIZE].tobytes()

    def active(self, owner: int | None = None) -> list[int]:
        """Indices of the ACTIVE entries (of queue pair ``owner`` if given)."""
        found = _positions(self._states(), _SELECT_ACTIVE)
        if owner is None:
            return found
        e16 = self._e16
        return [index for index in found if e16[index * _HWORDS + _HW_OWNER] == owner]

    def in_progress(self) -> list[int]:
        """Indices of the entries in NEW..TYPED."""
        return _positions(self._states(), _SELECT_PROGRESS)

    def counters(self) -> dict[str, int]:
        """Header counters and statistics."""
        h, q = self._h32, self._h64
        counts = {"active": h[_H_N_ACTIVE], "in_progress": h[_H_N_PROGRESS], "free": h[_H_N_FREE],
                  "capacity": self.capacity}
        counts.update({word.name.lower(): q[word] for word in StatWord})
        return counts

    def count_recovery(self) -> None:
        """Count one recovery in the statistics."""
        self._h64[StatWord.RECOVERIES] += 1

    # -- repair and verification ----------------------------------------------------------------

    def _drop(self, index: int) -> None:
        """Mark entry ``index`` FREE with a new generation (links and counters are rebuilt after)."""
        words = index * ENTRY_WORDS
        self._e8[index * ENTRY_SIZE] = _FREE
        self._e32[words + _GEN] = (self._e32[words + _GEN] + 1) & 0xFFFFFFFF
        self._e32[words + _APID] = 0

    def rebuild(self, live: Callable[[int], bool]) -> list[str]:
        """Repair after a writer died mid-mutation (exclusive access); returns what was done.

        The entry named by the mutation record is discarded, in-progress entries whose
        allocator is not ``live`` are freed, ACTIVE entries with unusable or duplicate keys are
        freed, then the index, the free list and the counters are rebuilt from the entries.
        """
        notes: list[str] = []
        _pid, op, entry = self.mutation()
        if entry < self.capacity:
            notes.append(f"discarded entry {entry} (interrupted {_op_name(op)})")
            self._drop(entry)
        dead = [i for i in self.in_progress() if not live(self.allocator(i))]
        for index in dead:
            self._drop(index)
        if dead:
            notes.append(f"freed {len(dead)} in-progress entries of dead processes")
        self._ibytes[:] = bytes(len(self._ibytes))
        active = 0
        for index in self.active():
            keys = (self.key_of(index, 0), self.key_of(index, 1))
            homes = (self.bucket(keys[0]), self.bucket(keys[1]))
            bad = keys[0] == keys[1] or any(key[0] not in (Pif.GUEST, Pif.HOST) for key in keys)
            if bad or any(self.find(k, b) >= 0 for k, b in zip(keys, homes)):
                notes.append(f"freed entry {index}: {'bad' if bad else 'duplicate'} key")
                self._drop(index)
                continue
            for side in (0, 1):
                self._e32[index * ENTRY_WORDS + _HOME + side] = homes[side]
                self._insert(2 * index + side, homes[side])
            active += 1
        free = _positions(self._states(), _SELECT_FREE)
        for here, there in zip(free, free[1:]):
            self._e32[here * ENTRY_WORDS + _NEXT] = there
        if free:
            self._e32[free[-1] * ENTRY_WORDS + _NEXT] = NO_ENTRY
        h = self._h32
        h[_H_FREE_HEAD] = free[0] if free else NO_ENTRY
        h[_H_N_FREE] = len(free)
        h[_H_N_ACTIVE] = active
        h[_H_N_PROGRESS] = self.capacity - len(free) - active
        self._unmark()
        notes.append(f"rebuilt index ({active} flows) and free list ({len(free)} entries)")
        return notes

    def free_dead_progress(self, live: Callable[[int], bool]) -> int:
        """Cancel the in-progress entries whose allocator is not ``live`` (write lock held)."""
        dead = [i for i in self.in_progress() if not live(self.allocator(i))]
        for index in dead:
            self.cancel(index)
        return len(dead)

    def check(self) -> list[str]:
        """Every violated invariant, as text (empty when consistent); read lock held."""
        problems: list[str] = []
        cap, h = self.capacity, self._h32
        states = self._states()
        bad = [i for i, state in enumerate(states) if state > _ACTIVE]
        problems += [f"entry {i}: invalid state {states[i]}" for i in bad[:10]]
        n_free, n_active = states.count(_FREE), states.count(_ACTIVE)
        n_progress = cap - n_free - n_active - len(bad)
        for name, word, real in (("free", _H_N_FREE, n_free), ("active", _H_N_ACTIVE, n_active),
                                 ("in-progress", _H_N_PROGRESS, n_progress)):
            if h[word] != real:
                problems.append(f"counter {name} is {h[word]}, {real} entries are {name}")
        problems += self._check_free_list(states, n_free)
        problems += self._check_index(states, n_active)
        pid, _op, entry = self.mutation()
        if pid:
            problems.append(f"mutation of entry {entry} by pid {pid} in progress")
        return problems

    def _check_free_list(self, states: bytes, n_free: int) -> list[str]:
        """Problems of the free list: bad links, cycles, non-FREE members, wrong length."""
        seen = bytearray(self.capacity)
        index, length = self._h32[_H_FREE_HEAD], 0
        while index != NO_ENTRY:
            if index >= self.capacity:
                return [f"free list links to {index}, outside the table"]
            if seen[index]:
                return [f"free list loops at entry {index}"]
            if states[index] != _FREE:
                return [f"entry {index} on the free list is in state {states[index]}"]
            seen[index] = 1
            length += 1
            index = self._e32[index * ENTRY_WORDS + _NEXT]
        return [] if length == n_free else [f"free list has {length} entries, {n_free} are FREE"]

    def _check_index(self, states: bytes, n_active: int) -> list[str]:
        """Problems of the hash index: foreign members, unreachable or duplicate keys, missing sides."""
        problems: list[str] = []
        members: set[int] = set()
        keys: dict[bytes, int] = {}
        idx = self._idx
        for bucket in range(self.index_size):
            value = idx[bucket]
            if not value:
                continue
            sidx = value - 1
            index = sidx >> 1
            if index >= self.capacity or states[index] != _ACTIVE:
                problems.append(f"bucket {bucket} holds sidx {sidx}, not an active flow")
                continue
            if sidx in members:
                problems.append(f"sidx {sidx} is in the index twice")
            members.add(sidx)
            key = self.key_of(index, sidx & 1)
            home = self.bucket(key)
            if keys.setdefault(key, sidx) != sidx:
                problems.append(f"duplicate key: sidx {sidx} and {keys[key]}")
            if self._e32[index * ENTRY_WORDS + _HOME + (sidx & 1)] != home:
                problems.append(f"sidx {sidx}: stored home bucket is wrong")
            elif self.find(key, home) != sidx:
                problems.append(f"sidx {sidx} is not reachable from its home bucket {home}")
        for index in _positions(states, _SELECT_ACTIVE):
            for side in (0, 1):
                if 2 * index + side not in members:
                    problems.append(f"entry {index} side {side} is not in the index")
        if len(members) != 2 * n_active:
            problems.append(f"index holds {len(members)} sides for {n_active} active flows")
        return problems
