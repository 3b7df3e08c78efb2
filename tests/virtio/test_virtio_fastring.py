"""The compiled ring helper against the Python reference: same rings in, same results out, byte for byte.

Each example builds guest memory twice, identically (two memfds with the
same bytes at the same guest-physical addresses): a ring whose descriptor
table, avail ring, indirect tables and indices are drawn by hypothesis,
valid and hostile (heads and ``next`` past the table, loops, buffers outside
or straddling the regions, indirect tables of bad lengths or nested, avail
indices far ahead, any flag bits).  The reference :class:`Virtqueue` runs on
one copy and :class:`FastVirtqueue` on the other through the same sequence
of calls, with the guest changing its ring between calls.  Every call must
give the same result (chains as bytes, counts, booleans) or the same error
(type and message); at the end the two memories must be equal byte for byte
(the device writes only the used ring) and the indices the same.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from dirtylogkit import log_file
from ringhelper import GPA_BASE, NEXT, WRITE, DriverRing, SharedMemory

from shardswitch.vhost.wire import MemRegion
from shardswitch.virtio import ringimpl
from shardswitch.virtio.dirtylog import DirtyLog
from shardswitch.virtio.fastring import FastVirtqueue, make_virtqueue
from shardswitch.virtio.memory import GuestMemory
from shardswitch.virtio.virtqueue import GATHER_MAX, Virtqueue

NUM = 16
SIZE = 0x40000
#: Memfd offset of the ring, of the area where indirect tables are drawn, and of the data buffers.
RING_AT = 0x1000
TABLES_AT = 0x8000
DATA_AT = 0x10000
#: A second region, of the second half of the memfd, seen at a guest-physical address of its own.
SECOND_GPA = 0x9000_0000
EXAMPLES = max(50, int(os.environ.get("SHARDSWITCH_FUZZ_EXAMPLES", "10000")) // 20)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
DESC = struct.Struct("<QIHH")

ADDRESS = st.one_of(
    st.integers(GPA_BASE + DATA_AT, GPA_BASE + SIZE // 2 - 1),              # in the first region
    st.integers(SECOND_GPA, SECOND_GPA + SIZE // 2 + 64),                   # in (or past) the second
    st.sampled_from([0, 0x10, GPA_BASE + SIZE // 2 - 8, 2 ** 64 - 8, GPA_BASE - 1]),
    st.integers(0, 2 ** 64 - 1),
)
LENGTH = st.one_of(st.integers(0, 4096), st.sampled_from([16, 32, 64, 0xFFFF_FFFF, 0x1_0000]))
FLAGS = st.one_of(st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, 4, 4 | NEXT, 4 | WRITE]), st.integers(0, 0xFFFF))
NEXT_INDEX = st.one_of(st.integers(0, NUM - 1), st.integers(0, 0xFFFF))
HOSTILE = st.tuples(ADDRESS, LENGTH, FLAGS, NEXT_INDEX)
#: Mostly plausible descriptors (inside a region, small flags, next inside the table), some hostile.
PLAUSIBLE = st.tuples(st.one_of(st.integers(GPA_BASE + DATA_AT, GPA_BASE + DATA_AT + 0x8000),
                                st.integers(SECOND_GPA, SECOND_GPA + 0x8000)),
                      st.integers(0, 2048), st.sampled_from([WRITE, WRITE, WRITE, 0, NEXT | WRITE, NEXT, 4]),
                      st.integers(0, NUM - 1))
DESCRIPTOR = st.one_of(PLAUSIBLE, PLAUSIBLE, PLAUSIBLE, HOSTILE)
#: An indirect table: where it is (an offset in the tables area) and its descriptors.
TABLE = st.tuples(st.integers(0, 31), st.lists(DESCRIPTOR, min_size=1, max_size=6))
INDIRECT_AT = st.tuples(st.integers(0, 31), st.sampled_from([16, 32, 48, 96, 0, 20]))

POP = st.tuples(st.just("pop"))
POP_FRAME = st.tuples(st.just("pop_frame"), st.sampled_from([0, 10, 12, 40]), st.sampled_from([0, 64, 3000, GATHER_MAX]))
POP_WRITABLE = st.tuples(st.just("pop_writable"), st.integers(0, 20000), st.integers(0, NUM + 1))
OPS = st.lists(st.one_of(
    POP, POP, POP, POP_WRITABLE, POP_WRITABLE, POP_WRITABLE, POP_FRAME, POP_FRAME, POP_FRAME,
    st.tuples(st.just("unpop"), st.integers(-1, 4)),
    st.tuples(st.just("push"), st.integers(-1, NUM), st.integers(0, 5000)),
    st.tuples(st.just("push_run"), st.lists(st.integers(-1, NUM), max_size=5),
              st.lists(st.integers(0, 3000), max_size=5), st.integers(-1, 10000)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("enable_kicks")),
    st.tuples(st.just("disable_kicks")),
    st.tuples(st.just("avail_pending")),
    st.tuples(st.just("reposition"), st.one_of(st.integers(-3, 3), st.integers(0, 0xFFFF))),
    st.tuples(st.just("guest_publish"), st.integers(0, NUM + 2)),
    st.tuples(st.just("guest_event"), st.integers(0, 0xFFFF), st.integers(0, 1)),
), max_size=24)


class Copy:
    """One copy of the guest: its memfd, the device's GuestMemory and a driver ring over it."""

    def __init__(self) -> None:
        """Map the memfd as two regions (two translations to tell apart)."""
        self.shm = SharedMemory(SIZE)
        self.mem = GuestMemory()
        half = SIZE // 2
        self.shm.attach(self.mem, self.shm.region(0, half))
        self.shm.attach(self.mem, MemRegion(SECOND_GPA, half, 0x7F00_0000_0000, half))
        self.ring = DriverRing(self.shm, NUM, base=RING_AT)

    def close(self) -> None:
        """Unmap everything."""
        self.mem.clear()
        self.shm.close()


def _call(fn: Any, *args: Any) -> object:
    """``fn(*args)`` as a comparable value: chains as bytes, errors as (type, message)."""
    try:
        result = fn(*args)
    except (ValueError, Exception) as exc:      # VirtqueueError, ValueError: both compared
        return ("raised", type(exc).__name__, str(exc))
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], list):
        head, readable, writable = result
        return (head, [bytes(b) for b in readable], [bytes(b) for b in writable])
    return result


def _run(vq: Virtqueue, copy: Copy, op: tuple[Any, ...]) -> object:
    """Apply one operation to one copy; return what it gave."""
    name = op[0]
    ring = copy.ring
    if name == "pop_writable":
        heads: list[int] = []
        bufs: list[list[memoryview]] = []
        sizes: list[int] = []
        got = _call(vq.pop_writable, op[1], op[2], heads, bufs, sizes)
        return (got, heads, [[bytes(b) for b in w] for w in bufs], sizes)
    if name == "pop_frame":
        got = _call(vq.pop_frame, op[1], memoryview(bytearray(op[2])))
        if isinstance(got, tuple) and len(got) == 3 and isinstance(got[1], memoryview):
            return (got[0], bytes(got[1]), got[2])
        return got
    if name == "push_run":
        return _call(vq.push_run, list(op[1]), list(op[2]), op[3])
    if name == "reposition":        # by a step (as a restart does), now and then anywhere
        vq.last_avail = (vq.last_avail + op[1]) & 0xFFFF
        return None
    if name == "guest_publish":
        for _ in range(op[1]):
            ring.post(ring.avail_idx % NUM, publish=False)
        ring.publish()
        return None
    if name == "guest_event":
        ring.set_used_event(op[1])
        ring.set_avail_flags(op[2])
        return None
    return _call(getattr(vq, name), *op[1:])


def _outcome(name: str, result: object) -> str:
    """What kind of result a call had, for hypothesis's statistics (``--hypothesis-show-statistics``)."""
    if isinstance(result, tuple) and result and result[0] == "raised":
        return f"{name}: " + re.sub(r"\b(0x[0-9a-f]+|-?\d+)\b", "N", str(result[2]).split(":")[-1].strip())
    if isinstance(result, tuple) and name == "pop_frame":
        return f"{name}: {'empty' if not result[1] else 'frame'}"
    if isinstance(result, tuple) and name == "pop_writable":
        return f"{name}: {'refused' if isinstance(result[0], tuple) else 'took ' + str(min(len(result[1]), 2))}"
    if isinstance(result, tuple):
        return f"{name}: chain"
    return f"{name}: " + ("N" if type(result) is int else repr(result))


def _lay_out(copy: Copy, descs: list[tuple[int, int, int, int]], tables: list[tuple[int, list[Any]]],
             indirect_at: list[tuple[int, int]], avail: list[int], avail_idx: int, filler: bytes) -> None:
    """Write the drawn ring into one copy."""
    mm = copy.shm.mm
    mm[DATA_AT:DATA_AT + len(filler)] = filler
    mm[SIZE // 2:SIZE // 2 + len(filler)] = filler[::-1]
    for at, entries in tables:
        for pos, entry in enumerate(entries):
            DESC.pack_into(mm, TABLES_AT + 16 * at + 16 * pos, *entry)
    for index, entry in enumerate(descs):
        addr, length, flags, nxt = entry
        if flags & 4 and indirect_at:
            at, size = indirect_at[index % len(indirect_at)]
            addr, length = GPA_BASE + TABLES_AT + 16 * at, size
        copy.ring.write_desc(index, addr, length, flags, nxt)
    for head in avail:
        copy.ring.post(head, publish=False)
    copy.ring.publish(avail_idx)


@FUZZ
@given(descs=st.lists(DESCRIPTOR, min_size=NUM, max_size=NUM), tables=st.lists(TABLE, max_size=3),
       indirect_at=st.lists(INDIRECT_AT, max_size=3),
       avail=st.lists(st.one_of(*[st.integers(0, NUM - 1)] * 8, st.integers(0, 0xFFFF)), max_size=NUM),
       forged_idx=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF)), event_idx=st.booleans(), indirect=st.booleans(),
       start=st.integers(0, 0xFFFF), filler=st.binary(min_size=64, max_size=256), ops=OPS, tx=st.booleans())
def test_compiled_ring_gives_what_the_reference_gives(descs: list[tuple[int, int, int, int]],
                                                      tables: list[tuple[int, list[Any]]],
                                                      indirect_at: list[tuple[int, int]], avail: list[int],
                                                      forged_idx: int | None, event_idx: bool, indirect: bool,
                                                      start: int, filler: bytes, ops: list[tuple[Any, ...]],
                                                      tx: bool) -> None:
    """Every call: the same result or the same error; at the end, the same memory and indices.  ``tx``: a
    transmit ring (no WRITE flag anywhere), whose chains ``pop_frame`` takes."""
    if tx:
        descs = [(addr, length, flags & ~WRITE, nxt) for addr, length, flags, nxt in descs]
        tables = [(at, [(a, n, f & ~WRITE, x) for a, n, f, x in entries]) for at, entries in tables]
    copies = [Copy(), Copy()]
    try:
        queues: list[Virtqueue] = []
        for copy, cls in zip(copies, (Virtqueue, FastVirtqueue)):
            copy.ring.start_idx = copy.ring.avail_idx = copy.ring.last_used = start
            _lay_out(copy, descs, tables, indirect_at, avail,
                     (start + len(avail)) & 0xFFFF if forged_idx is None else forged_idx, filler)
            lay = copy.ring.layout
            queues.append(cls(copy.mem, NUM, copy.ring.uva(lay.desc), copy.ring.uva(lay.avail),
                              copy.ring.uva(lay.used), start, event_idx=event_idx, indirect=indirect))
        for op in ops:
            results = [_run(vq, copy, op) for vq, copy in zip(queues, copies)]
            assert results[1] == results[0], op
            event(_outcome(op[0], results[0]))
        assert [(vq.last_avail, vq.used_idx()) for vq in queues][1] == (queues[0].last_avail, queues[0].used_idx())
        assert copies[1].shm.mm[:] == copies[0].shm.mm[:]
        for vq in queues:
            vq.release()
    finally:
        for copy in copies:
            copy.close()


def test_the_compiled_helper_is_built_and_in_use() -> None:
    """pip builds the helper (make installs the compiler); this module is left out of the reference pass."""
    assert ringimpl.compiled() is not None and ringimpl.name() == "c"


def test_the_factory_gives_the_compiled_queue(shm: SharedMemory, mem: GuestMemory) -> None:
    """With the helper in use, rings are built on it; they release cleanly and memory then unmaps."""
    ring = DriverRing(shm, NUM)
    lay = ring.layout
    vq = make_virtqueue(mem, NUM, ring.uva(lay.desc), ring.uva(lay.avail), ring.uva(lay.used), 0, event_idx=True)
    assert isinstance(vq, FastVirtqueue)
    head = ring.chain([(100, True)])
    ring.post(head)
    chain = vq.pop()
    assert chain is not None and chain[0] == head and [len(b) for b in chain[2]] == [100]
    vq.push(head, 10)
    assert vq.flush()
    assert ring.collect() == [(head, 10)]
    del chain
    vq.release()
    mem.clear()                 # no export left behind: the mapping goes


def test_logging_hands_the_indices_to_the_reference_and_back(shm: SharedMemory, mem: GuestMemory) -> None:
    """A queue that starts logging carries on from the compiled queue's indices, and back again."""
    ring = DriverRing(shm, NUM)
    lay = ring.layout
    vq = make_virtqueue(mem, NUM, ring.uva(lay.desc), ring.uva(lay.avail), ring.uva(lay.used), 0, event_idx=True)
    heads = [ring.chain([(64, True)]) for _ in range(3)]
    for head in heads:
        ring.post(head)
    first = vq.pop()
    assert first is not None
    vq.push(first[0], 8)
    fd = log_file(4096)
    dirty = DirtyLog(fd, 4096, 0)
    os.close(fd)
    vq.start_logging(dirty, ring.gpa(lay.used))
    second = vq.pop()
    assert second is not None and second[0] == heads[1]
    vq.push(second[0], 8)
    assert vq.flush()
    vq.stop_logging()
    dirty.close()
    third = vq.pop()
    assert third is not None and third[0] == heads[2]
    vq.push(third[0], 8)
    vq.flush()
    assert ring.collect() == [(heads[0], 8), (heads[1], 8), (heads[2], 8)]
    assert vq.last_avail == 3 and vq.used_idx() == 3
    del first, second, third
    vq.release()
