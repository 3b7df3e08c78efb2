"""The receive batches of Virtqueue (pop_writable, push_run) against the one-chain calls they stand for.

Two device queues read the same driver ring: one takes chains with
``pop_writable``, the other with repeated ``pop``; both must take the same
chains (same heads, the same guest bytes), the same byte counts, end at the
same avail index, and refuse the same broken rings while taking nothing.
Likewise ``push_run`` and repeated ``push`` over two identical rings must
leave the same used ring.  Rings are drawn by hypothesis, valid and hostile
(readable-only chains, heads past the table, buffers outside guest memory,
an avail index too far ahead).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ringhelper import NEXT, WRITE, DriverRing, SharedMemory

from shardswitch.virtio.memory import GuestMemory
from shardswitch.virtio.virtqueue import Virtqueue, VirtqueueError

NUM = 16
EXAMPLES = max(50, int(os.environ.get("SHARDSWITCH_FUZZ_EXAMPLES", "10000")) // 20)
BATCH = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: One posted chain: a kind and buffer sizes.  "w": writable buffers linked with NEXT; "r": one readable
#: buffer (no room for a frame); "head": an avail slot naming a head past the table; "out": a writable
#: buffer outside guest memory.
CHAIN = st.one_of(
    st.tuples(st.just("w"), st.lists(st.integers(1, 3000), min_size=1, max_size=3)),
    st.tuples(st.just("r"), st.lists(st.integers(1, 100), min_size=1, max_size=1)),
    st.tuples(st.sampled_from(["head", "out"]), st.just([1])),
)


def build(shm: SharedMemory, base: int, chains: list[tuple[str, list[int]]], forged_idx: bool) -> DriverRing:
    """A ring at memfd offset ``base`` with ``chains`` posted, each buffer holding bytes of its own."""
    ring = DriverRing(shm, NUM, base=base)
    for kind, sizes in chains:
        if kind == "head":
            ring.post(NUM + 3)
            continue
        ids = [ring.free.pop(0) for _ in sizes]
        for pos, (size, index) in enumerate(zip(sizes, ids)):
            more = pos + 1 < len(sizes)
            addr = ring.gpa(ring.alloc(size, os.urandom(size))) if kind != "out" else 0x10
            flags = (0 if kind == "r" else WRITE) | (NEXT if more else 0)
            ring.write_desc(index, addr, size, flags, ids[pos + 1] if more else 0)
        ring.post(ids[0])
    if forged_idx:
        ring.publish(ring.avail_idx + NUM + 1)
    return ring


def by_pop(vq: Virtqueue, need: int, limit: int) -> tuple[object, ...]:
    """What repeated ``pop`` calls take, with RxWriter's rules; everything given back on an error."""
    heads: list[int] = []
    taken: list[list[bytes]] = []
    got = 0
    try:
        while got < need and len(heads) < limit:
            chain = vq.pop()
            if chain is None:
                break
            head, _readable, writable = chain
            if not writable:
                vq.unpop(1)
                raise VirtqueueError("no writable buffer")
            heads.append(head)
            taken.append([bytes(b) for b in writable])
            got += sum(len(b) for b in writable)
    except VirtqueueError:
        vq.unpop(len(heads))
        return ("refused", vq.last_avail)
    return (heads, taken, got, vq.last_avail)


def by_batch(vq: Virtqueue, need: int, limit: int) -> tuple[object, ...]:
    """What one ``pop_writable`` call takes."""
    heads: list[int] = []
    bufs: list[list[memoryview]] = []
    sizes: list[int] = []
    try:
        got = vq.pop_writable(need, limit, heads, bufs, sizes)
    except VirtqueueError:
        assert heads == [] and bufs == [] and sizes == []
        return ("refused", vq.last_avail)
    assert sizes == [sum(len(b) for b in w) for w in bufs]
    return (heads, [[bytes(b) for b in w] for w in bufs], got, vq.last_avail)


@BATCH
@given(chains=st.lists(CHAIN, max_size=NUM).filter(lambda cs: sum(len(sizes) for _, sizes in cs) <= NUM), need=st.integers(0, 20000), limit=st.integers(0, NUM),
       forged=st.booleans(), rounds=st.integers(1, 3))
def test_pop_writable_takes_what_pops_take(shm: SharedMemory, mem: GuestMemory, chains: list[tuple[str, list[int]]],
                                           need: int, limit: int, forged: bool, rounds: int) -> None:
    """Same chains, bytes, counts and position as repeated pops, round after round; the same refusals."""
    ring = build(shm, 0x1000, chains, forged)
    one, batch = ring.device(mem), ring.device(mem)
    for _ in range(rounds):
        assert by_batch(batch, need, limit) == by_pop(one, need, limit)
    one.release()
    batch.release()


@BATCH
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=NUM - 4), total=st.integers(-1, 80000),
       pending=st.integers(0, 4))
def test_push_run_stages_what_pushes_stage(shm: SharedMemory, mem: GuestMemory, sizes: list[int], total: int,
                                           pending: int) -> None:
    """The same used elements, count and published index as pushing chain by chain."""
    rings = [DriverRing(shm, NUM, base=base) for base in (0x1000, 0x40000)]
    queues = [ring.device(mem) for ring in rings]
    heads = list(range(len(sizes)))[::-1]
    for vq in queues:
        for head in range(pending):
            vq.push(head, 1)
    left = total
    used_one = 0
    for head, size in zip(heads, sizes):
        if left <= 0:
            break
        queues[0].push(head, min(size, left))
        left -= min(size, left)
        used_one += 1
    assert queues[1].push_run(heads, sizes, total) == used_one
    for vq in queues:
        vq.flush()
    assert [ring.used_idx() for ring in rings] == [pending + used_one] * 2
    layouts = [ring.layout for ring in rings]
    assert shm.mm[layouts[0].used:layouts[0].used + 4 + 8 * NUM] == \
        shm.mm[layouts[1].used:layouts[1].used + 4 + 8 * NUM]
    for vq in queues:
        vq.release()


def test_push_run_refuses_a_full_ring_like_push(shm: SharedMemory, mem: GuestMemory) -> None:
    """Staging past the ring's size is a caller bug: ValueError, the elements before it staged."""
    vq = DriverRing(shm, 4).device(mem)
    with pytest.raises(ValueError):
        vq.push_run([0, 1, 2, 3, 0], [1] * 5, 100)
    assert vq.flush()
    with pytest.raises(ValueError):
        vq.push_run([7], [1], 1)
    vq.release()
