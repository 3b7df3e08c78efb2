"""Virtqueue against a driver writing real rings in a shared memfd."""

from __future__ import annotations

import time

import pytest
from ringhelper import INDIRECT, NEXT, WRITE, DriverRing, SharedMemory

from shardswitch.virtio.memory import GuestMemory
from shardswitch.virtio.virtqueue import Virtqueue, VirtqueueError, vring_need_event


def make(shm: SharedMemory, mem: GuestMemory, num: int = 8, start: int = 0,
         **kw: bool) -> tuple[DriverRing, Virtqueue]:
    """A driver ring and the device queue over it."""
    ring = DriverRing(shm, num, start_idx=start)
    return ring, ring.device(mem, **kw)


def lengths(bufs: list[memoryview]) -> list[int]:
    """Buffer sizes."""
    return [len(b) for b in bufs]


# ------------------------------------------------------------------ geometry


@pytest.mark.parametrize("num", [0, 3, 6, 65536, 65535])
def test_queue_size_must_be_power_of_two(shm: SharedMemory, mem: GuestMemory, num: int) -> None:
    """num must be a power of two in 1..32768."""
    ring = DriverRing(shm, 8)
    lay = ring.layout
    with pytest.raises(VirtqueueError):
        Virtqueue(mem, num, ring.uva(lay.desc), ring.uva(lay.avail), ring.uva(lay.used), 0, event_idx=False)


@pytest.mark.parametrize("area, delta", [("desc", 8), ("avail", 1), ("used", 2)])
def test_misaligned_areas_are_refused(shm: SharedMemory, mem: GuestMemory, area: str, delta: int) -> None:
    """desc 16-, avail 2-, used 4-byte alignment."""
    ring = DriverRing(shm, 8)
    addrs = {"desc": ring.layout.desc, "avail": ring.layout.avail, "used": ring.layout.used}
    addrs[area] += delta
    with pytest.raises(VirtqueueError, match="aligned"):
        Virtqueue(mem, 8, ring.uva(addrs["desc"]), ring.uva(addrs["avail"]), ring.uva(addrs["used"]), 0,
                  event_idx=False)


@pytest.mark.parametrize("area", ["desc", "avail", "used"])
def test_areas_outside_memory_are_refused(shm: SharedMemory, mem: GuestMemory, area: str) -> None:
    """An area that does not fit entirely in guest memory is refused."""
    ring = DriverRing(shm, 8)
    addrs = {"desc": ring.layout.desc, "avail": ring.layout.avail, "used": ring.layout.used}
    addrs[area] = shm.size - 16      # aligned for all three, but runs past the end
    with pytest.raises(VirtqueueError, match="outside"):
        Virtqueue(mem, 8, ring.uva(addrs["desc"]), ring.uva(addrs["avail"]), ring.uva(addrs["used"]), 0,
                  event_idx=False)


# ------------------------------------------------------------------ chains


def test_empty_ring_pops_none(shm: SharedMemory, mem: GuestMemory) -> None:
    """Nothing available: None, and nothing changes."""
    _ring, vq = make(shm, mem)
    assert vq.pop() is None
    assert vq.avail_pending() == 0
    assert vq.last_avail == 0
    vq.release()


def test_single_descriptor_chains(shm: SharedMemory, mem: GuestMemory) -> None:
    """One readable and one writable single-descriptor chain; buffers are guest memory."""
    ring, vq = make(shm, mem)
    h1 = ring.chain([(100, False)])
    h2 = ring.chain([(200, True)])
    ring.post(h1)
    ring.post(h2)
    assert vq.avail_pending() == 2
    head, readable, writable = vq.pop() or (None, [], [])
    assert head == h1 and lengths(readable) == [100] and writable == []
    assert bytes(readable[0]) == b"\x01" * 100
    head, readable, writable = vq.pop() or (None, [], [])
    assert head == h2 and readable == [] and lengths(writable) == [200]
    writable[0][:5] = b"hello"                      # zero copy: the driver sees it
    assert vq.pop() is None
    assert vq.last_avail == 2
    vq.push(h2, 5)
    vq.push(h1, 0)
    assert ring.collect() == []                     # not visible before flush
    assert vq.flush() is True
    assert ring.collect() == [(h2, 5), (h1, 0)]
    assert vq.used_idx() == 2
    assert vq.flush() is False                      # nothing pending
    del readable, writable
    vq.release()


def test_multi_descriptor_chain(shm: SharedMemory, mem: GuestMemory) -> None:
    """NEXT links readable then writable descriptors, in order."""
    ring, vq = make(shm, mem)
    head = ring.chain([(10, False), (20, False), (30, True), (40, True)])
    ring.post(head)
    chain = vq.pop()
    assert chain is not None
    assert chain[0] == head
    assert lengths(chain[1]) == [10, 20] and lengths(chain[2]) == [30, 40]
    assert [bytes(b[:1]) for b in chain[1] + chain[2]] == [b"\x01", b"\x02", b"\x03", b"\x04"]
    del chain
    vq.release()


def test_chain_of_exactly_num_descriptors(shm: SharedMemory, mem: GuestMemory) -> None:
    """A chain using the whole table is legal (the loop bound is not off by one)."""
    ring, vq = make(shm, mem, num=4)
    head = ring.chain([(8, False)] * 4)
    ring.post(head)
    chain = vq.pop()
    assert chain is not None and len(chain[1]) == 4
    del chain
    vq.release()


def test_indirect_chain(shm: SharedMemory, mem: GuestMemory) -> None:
    """A normal descriptor followed by an indirect table (spec: zero or more normal, then INDIRECT)."""
    ring, vq = make(shm, mem)
    table, length = ring.indirect_table([(11, False), (22, True), (33, True)])
    first = ring.alloc(5, b"first")
    ring.write_desc(0, ring.gpa(first), 5, NEXT, 1)
    ring.write_desc(1, ring.gpa(table), length, INDIRECT | WRITE)   # WRITE on it is ignored
    ring.post(0)
    chain = vq.pop()
    assert chain is not None
    head, readable, writable = chain
    assert head == 0
    assert lengths(readable) == [5, 11] and lengths(writable) == [22, 33]
    assert bytes(readable[0]) == b"first" and bytes(readable[1][:1]) == b"\x40"
    del chain, readable, writable
    vq.release()


@pytest.mark.parametrize("case", ["not negotiated", "nested", "zero length", "odd length",
                                  "with next", "outside memory", "loop inside"])
def test_bad_indirect_tables(shm: SharedMemory, mem: GuestMemory, case: str) -> None:
    """Every malformed use of INDIRECT raises VirtqueueError without consuming the chain."""
    ring, vq = make(shm, mem, indirect=case != "not negotiated")
    table, length = ring.indirect_table([(16, False), (16, False)])
    flags = INDIRECT
    if case == "nested":
        ring.write_desc(1, ring.gpa(table), length, INDIRECT, table=table)
    elif case == "zero length":
        length = 0
    elif case == "odd length":
        length = 17
    elif case == "with next":
        flags |= NEXT
        ring.write_desc(1, ring.gpa(ring.alloc(4)), 4)
    elif case == "outside memory":
        table = shm.size - 16
    elif case == "loop inside":
        ring.write_desc(1, ring.gpa(ring.alloc(4)), 4, NEXT, 0, table=table)
    ring.write_desc(0, ring.gpa(table), length, flags, 1)
    ring.post(0)
    with pytest.raises(VirtqueueError):
        vq.pop()
    assert vq.last_avail == 0
    vq.release()


@pytest.mark.parametrize("links", [[0], [1, 0], [1, 2, 3, 1]])
def test_looping_chain_is_refused_quickly(shm: SharedMemory, mem: GuestMemory, links: list[int]) -> None:
    """Descriptor loops (self, two-cycle, loop after a prefix) end in an error, not a hang."""
    ring, vq = make(shm, mem, num=256)
    buf = ring.gpa(ring.alloc(64))
    for index, nxt in enumerate(links):
        ring.write_desc(index, buf, 64, NEXT, nxt)
    ring.post(0)
    started = time.monotonic()
    with pytest.raises(VirtqueueError, match="loop"):
        vq.pop()
    assert time.monotonic() - started < 1.0
    vq.release()


@pytest.mark.parametrize("case", ["addr outside", "len past end", "next out of range", "head out of range",
                                  "readable after writable"])
def test_bad_descriptors(shm: SharedMemory, mem: GuestMemory, case: str) -> None:
    """Descriptor contents are validated before use; last_avail does not move."""
    ring, vq = make(shm, mem)
    buf = ring.gpa(ring.alloc(64))
    head = 0
    if case == "addr outside":
        ring.write_desc(0, 0x10, 64)
    elif case == "len past end":
        ring.write_desc(0, ring.gpa(shm.size - 32), 64)
    elif case == "next out of range":
        ring.write_desc(0, buf, 64, NEXT, 8)
    elif case == "head out of range":
        head = 8
    elif case == "readable after writable":
        ring.write_desc(0, buf, 32, WRITE | NEXT, 1)
        ring.write_desc(1, buf + 32, 32, 0)
    ring.post(head)
    with pytest.raises(VirtqueueError):
        vq.pop()
    assert vq.last_avail == 0
    vq.release()


def test_avail_idx_jumping_too_far_is_refused(shm: SharedMemory, mem: GuestMemory) -> None:
    """avail.idx more than num ahead of last_avail means a corrupt ring."""
    ring, vq = make(shm, mem)
    ring.publish(9)
    with pytest.raises(VirtqueueError):
        vq.avail_pending()
    with pytest.raises(VirtqueueError):
        vq.pop()
    ring.publish(8)
    assert vq.avail_pending() == 8
    vq.release()


def test_base_must_be_16_bit(shm: SharedMemory, mem: GuestMemory) -> None:
    """SET_VRING_BASE beyond u16 is refused."""
    ring = DriverRing(shm, 8)
    with pytest.raises(VirtqueueError):
        ring.device(mem, last_avail=0x10000)


# -------------------------------------------------------------- indices


def test_wrap_around_at_65535(shm: SharedMemory, mem: GuestMemory) -> None:
    """Start at 65530 and cross 65535 -> 0 on both the avail and the used side."""
    ring, vq = make(shm, mem, num=8, start=65530)
    assert vq.used_idx() == 65530
    seen = []
    for round_ in range(3):                      # 3 x 5 chains: crosses the wrap once
        heads = [ring.chain([(16, True)]) for _ in range(5)]
        for h in heads:
            ring.post(h)
        assert vq.avail_pending() == 5
        for h in heads:
            chain = vq.pop()
            assert chain is not None and chain[0] == h
            vq.push(h, 16 + round_)
        vq.flush()
        seen += ring.collect()
        ring.free += heads
    assert vq.last_avail == (65530 + 15) & 0xFFFF == 9
    assert vq.used_idx() == 9 and ring.used_idx() == 9
    assert len(seen) == 15 and [n for _h, n in seen] == [16] * 5 + [17] * 5 + [18] * 5
    vq.release()


def test_unpop_gives_chains_back(shm: SharedMemory, mem: GuestMemory) -> None:
    """unpop(n) makes the last n chains available again, across the wrap too."""
    ring, vq = make(shm, mem, num=4, start=65535)
    heads = [ring.chain([(8, True)]) for _ in range(3)]
    for h in heads:
        ring.post(h)
    assert [c[0] for c in (vq.pop(), vq.pop()) if c] == heads[:2]
    vq.unpop(2)
    assert vq.last_avail == 65535
    assert [c[0] for c in (vq.pop(), vq.pop(), vq.pop()) if c] == heads
    with pytest.raises(ValueError):
        vq.unpop(4)
    vq.release()


def test_resume_from_base_after_reconnect(shm: SharedMemory, mem: GuestMemory) -> None:
    """A new Virtqueue started at the old last_avail sees the used idx left in memory."""
    ring, vq = make(shm, mem)
    for _ in range(3):
        ring.post(ring.chain([(8, True)]))
    for _ in range(2):
        chain = vq.pop()
        assert chain is not None
        vq.push(chain[0], 1)
    vq.flush()
    base = vq.last_avail
    vq.release()
    vq2 = ring.device(mem, last_avail=base)
    assert vq2.used_idx() == 2 and vq2.avail_pending() == 1
    vq2.release()


def test_repositioning_last_avail_rereads_avail_idx(shm: SharedMemory, mem: GuestMemory) -> None:
    """Setting last_avail (resume from the used index) never pops entries that are not there."""
    ring, vq = make(shm, mem)
    heads = [ring.chain([(8, True)]) for _ in range(3)]
    for h in heads:
        ring.post(h)
    fresh = ring.device(mem, last_avail=0)
    fresh.last_avail = 3                       # everything was already consumed
    assert fresh.pop() is None
    fresh.last_avail = 2
    chain = fresh.pop()
    assert chain is not None and chain[0] == heads[2]
    assert fresh.pop() is None
    with pytest.raises(ValueError):
        fresh.last_avail = 0x10000
    del chain
    fresh.release()
    vq.release()


# --------------------------------------------------------- notifications


@pytest.mark.parametrize("event, new, old, expected", [
    (0, 1, 0, True),            # crossing the event from just below
    (1, 1, 0, False),           # event not reached yet
    (5, 10, 2, True),           # event inside the published batch
    (10, 10, 2, False),         # event is the new index itself: not crossed
    (65535, 0, 65535, True),    # wrap: 65535 -> 0 crosses 65535
    (65534, 2, 65533, True),    # wrap inside the batch
    (3, 2, 65533, False),       # wrap, event still ahead
    (65530, 2, 65533, False),   # event behind the batch (stale)
    (65535, 65535, 65535, False),  # no movement
])
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    """vring_need_event in u16 arithmetic, including wrap-around."""
    assert vring_need_event(event, new, old) is expected


def test_event_idx_flush_decisions_across_wrap(shm: SharedMemory, mem: GuestMemory) -> None:
    """With EVENT_IDX, flush() interrupts only when used.idx crosses used_event."""
    ring, vq = make(shm, mem, num=8, start=65532, event_idx=True)

    def complete(count: int) -> bool:
        heads = [ring.chain([(8, True)]) for _ in range(count)]
        for h in heads:
            ring.post(h)
        for _ in heads:
            chain = vq.pop()
            assert chain is not None
            vq.push(chain[0], 8)
        ring.free += heads
        return vq.flush()

    assert complete(1) is True            # the first flush always signals (65532 -> 65533)
    ring.set_used_event(65535)            # "interrupt me after entry 65535 is used"
    assert complete(2) is False           # 65533 -> 65535: entry 65535 not yet used
    assert complete(2) is True            # 65535 -> 1: crosses 65535
    ring.set_used_event(0)
    assert complete(1) is False           # 1 -> 2: event 0 is behind (stale)
    ring.set_used_event(3)
    assert complete(3) is True            # 2 -> 5 crosses 3
    ring.set_avail_flags(1)               # flags are ignored under EVENT_IDX
    ring.set_used_event(5)
    assert complete(1) is True
    vq.release()


def test_flag_based_notifications(shm: SharedMemory, mem: GuestMemory) -> None:
    """Without EVENT_IDX: avail.flags NO_INTERRUPT, used.flags NO_NOTIFY."""
    ring, vq = make(shm, mem)
    ring.post(ring.chain([(8, True)]))
    ring.post(ring.chain([(8, True)]))
    for _ in range(2):
        chain = vq.pop()
        assert chain is not None
        vq.push(chain[0], 0)
        ring.set_avail_flags(1)
        assert vq.flush() is (chain[0] == 0)  # only the very first flush ignores the flag
    ring.set_avail_flags(0)
    ring.post(ring.chain([(8, True)]))
    chain = vq.pop()
    assert chain is not None
    vq.push(chain[0], 0)
    assert vq.flush() is True
    vq.disable_kicks()
    assert ring.used_flags() == 1
    assert vq.enable_kicks() is False
    assert ring.used_flags() == 0
    del chain
    vq.release()


@pytest.mark.parametrize("event_idx", [False, True])
def test_enable_kicks_race(shm: SharedMemory, mem: GuestMemory, event_idx: bool) -> None:
    """Buffers added between the drain and enable_kicks() are reported, not lost."""
    ring, vq = make(shm, mem, start=65534, event_idx=event_idx)
    vq.disable_kicks()
    ring.post(ring.chain([(8, True)]))
    assert vq.pop() is not None and vq.pop() is None      # drained
    ring.post(ring.chain([(8, True)]))                    # the guest adds one, no kick (disabled)
    assert vq.enable_kicks() is True                      # caller must drain again
    if event_idx:
        assert ring.avail_event() == 65535                # kick me when entry 65535 is published
    assert vq.pop() is not None and vq.pop() is None
    assert vq.enable_kicks() is False
    if event_idx:
        assert ring.avail_event() == 0                    # wrapped
    else:
        assert ring.used_flags() == 0
    vq.release()


def test_release_allows_unmapping(shm: SharedMemory) -> None:
    """After release() and dropping chains, guest memory unmaps cleanly."""
    mem = GuestMemory()
    shm.attach(mem)
    ring, vq = make(shm, mem)
    ring.post(ring.chain([(8, True)]))
    chain = vq.pop()
    vq.release()
    del chain
    mem.clear()                      # would raise GuestMemoryError if a view survived
