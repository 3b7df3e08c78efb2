"""Unit tests of the shared flow table in one process: life cycle, references, hash index, capacity."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shardswitch.shm import (FlowRef, FlowSide, FlowTable, FlowTableError, FlowType, Pif,
                             StaleReferenceError, State, TableFullError, ip16, ip_of, pack_key)
from shardswitch.shm.layout import Geometry


@pytest.fixture
def table() -> Iterator[FlowTable]:
    """A small table (capacity 8) for the test."""
    with FlowTable.create(capacity=8) as created:
        yield created


def guest_side(n: int) -> FlowSide:
    """Guest side number ``n``: guest 10.0.x.y:n talking to 192.0.2.1:53."""
    return FlowSide(Pif.GUEST, ip16(bytes([10, 0, n >> 8 & 255, n & 255])), 1024 + n, ip16("192.0.2.1"), 53)


def host_side(n: int) -> FlowSide:
    """Host side number ``n``: 192.0.2.1:53 answering our socket on port 40000 + n."""
    return FlowSide(Pif.HOST, ip16("192.0.2.1"), 53, ip16("198.51.100.7"), 40000 + n)


def make(table: FlowTable, n: int, owner: int = 0, ftype: FlowType = FlowType.UDP) -> FlowRef:
    """Create flow ``n`` through the whole life cycle; returns the winning reference."""
    ref = table.alloc()
    table.set_initiator(ref, guest_side(n))
    table.set_target(ref, host_side(n))
    table.set_type(ref, ftype, owner)
    won = table.activate(ref, now=100.0 + n)
    if won != ref:
        table.cancel(ref)
    return won


def test_create_lookup_both_sides_and_list(table: FlowTable) -> None:
    """A flow is found from either side, with its owner, and listed decoded."""
    ref = make(table, 1, owner=3)
    by_guest = table.lookup(FlowType.UDP, guest_side(1))
    by_host = table.lookup(FlowType.UDP, host_side(1))
    assert by_guest is not None and by_host is not None
    assert (by_guest.ref, by_guest.side, by_guest.owner) == (ref, 0, 3)
    assert (by_host.ref, by_host.side) == (ref, 1)
    assert table.lookup(FlowType.TCP, guest_side(1)) is None      # the type is part of the key
    assert table.lookup(FlowType.UDP, guest_side(2)) is None
    [flow] = table.list_flows()
    assert flow.ref == ref and flow.state is State.ACTIVE and flow.type is FlowType.UDP
    assert flow.initiator == guest_side(1) and flow.target == host_side(1)
    assert flow.last_activity == 101.0 and flow.owner == 3
    assert str(ip_of(flow.initiator.ep_addr)) == "10.0.0.1"
    assert table.get(ref) == flow
    assert table.check() == []


def test_life_cycle_refuses_steps_out_of_order(table: FlowTable) -> None:
    """Each step needs the state the previous step leaves."""
    ref = table.alloc()
    with pytest.raises(FlowTableError):
        table.set_target(ref, host_side(1))            # NEW: initiator first
    with pytest.raises(FlowTableError):
        table.set_type(ref, FlowType.UDP, 0)
    with pytest.raises(FlowTableError):
        table.activate(ref)
    table.set_initiator(ref, guest_side(1))
    with pytest.raises(FlowTableError):
        table.set_initiator(ref, guest_side(1))        # INI: not again
    with pytest.raises(FlowTableError):
        table.activate(ref)
    table.set_target(ref, host_side(1))
    with pytest.raises(FlowTableError):
        table.activate(ref)                            # TGT: type first
    table.set_type(ref, FlowType.UDP, 0)
    assert table.activate(ref) == ref
    with pytest.raises(StaleReferenceError):
        table.set_type(ref, FlowType.UDP, 0)           # no longer in progress
    assert table.check() == []


def test_in_progress_entries_are_invisible(table: FlowTable) -> None:
    """Listings skip NEW..TYPED entries; the counters count them apart."""
    ref = table.alloc()
    table.set_initiator(ref, guest_side(1))
    table.set_target(ref, host_side(1))
    table.set_type(ref, FlowType.UDP, 0)
    assert table.list_flows() == [] and table.get(ref) is None
    assert table.lookup(FlowType.UDP, guest_side(1)) is None
    assert table.counters()["in_progress"] == 1
    assert table.check() == []
    table.cancel(ref)
    assert table.counters()["in_progress"] == 0 and table.counters()["free"] == 8


def test_one_allocation_in_progress_per_process(table: FlowTable) -> None:
    """A second alloc() before activate/cancel is refused."""
    ref = table.alloc()
    with pytest.raises(FlowTableError):
        table.alloc()
    table.cancel(ref)
    assert table.pending is None
    table.cancel(table.alloc())


def test_bad_sides_and_types_refused(table: FlowTable) -> None:
    """Malformed sides, types and owners never reach the segment."""
    ref = table.alloc()
    with pytest.raises(FlowTableError):
        table.set_initiator(ref, FlowSide(Pif.NONE, ip16("10.0.0.1"), 1, ip16("10.0.0.2"), 2))
    with pytest.raises(FlowTableError):
        table.set_initiator(ref, FlowSide(Pif.GUEST, b"\x0a\x00\x00\x01", 1, ip16("10.0.0.2"), 2))
    with pytest.raises(FlowTableError):
        table.set_initiator(ref, FlowSide(Pif.GUEST, ip16("10.0.0.1"), 65536, ip16("10.0.0.2"), 2))
    table.set_initiator(ref, guest_side(1))
    table.set_target(ref, host_side(1))
    with pytest.raises(FlowTableError):
        table.set_type(ref, FlowType.NONE, 0)
    with pytest.raises(FlowTableError):
        table.set_type(ref, FlowType.UDP, 70000)
    table.cancel(ref)
    with pytest.raises(FlowTableError):
        table.lookup_key(b"short")
    with pytest.raises(FlowTableError):
        ip16("not an address")
    with pytest.raises(FlowTableError):
        table.touch(8, 1.0)


def test_same_key_twice_gives_one_flow(table: FlowTable) -> None:
    """Activating a flow whose key exists returns the existing flow; the loser cancels."""
    first = make(table, 1)
    ref = table.alloc()
    table.set_initiator(ref, guest_side(1))
    table.set_target(ref, host_side(99))          # only the guest side collides
    table.set_type(ref, FlowType.UDP, 1)
    assert table.activate(ref) == first
    table.cancel(ref)
    assert len(table.list_flows()) == 1
    assert table.counters()["duplicates"] == 1
    assert table.check() == []


def test_stale_references(table: FlowTable) -> None:
    """After removal the old reference matches nothing, even once the entry is reused."""
    old = make(table, 1)
    assert table.remove(old)
    assert not table.remove(old)
    new = make(table, 2)
    assert new.entry == old.entry and new.generation != old.generation
    assert table.get(old) is None
    assert not table.set_owner(old, 5)
    assert not table.remove(old)
    assert table.get(new) is not None
    assert table.check() == []


def test_set_owner_touch_remove_owned_by(table: FlowTable) -> None:
    """Ownership moves; activity is recorded; a dead worker's flows go in one call."""
    refs = [make(table, n, owner=n % 2) for n in range(6)]
    assert table.set_owner(refs[0], 1)
    table.touch(refs[1].entry, 555.5)
    flow = table.get(refs[1])
    assert flow is not None and flow.last_activity == 555.5
    mine = sorted(r.entry for r in refs[:2] + refs[3::2])
    assert sorted(f.entry for f in table.list_flows(owner=1)) == mine
    assert table.remove_owned_by(1) == 4
    assert [f.owner for f in table.list_flows()] == [0, 0]
    assert table.remove_many([refs[2], refs[4], refs[1]]) == 2
    assert table.list_flows() == [] and table.check() == []


def test_published_timeout_is_listed_and_cleared_with_the_entry(table: FlowTable) -> None:
    """A flow's idle timeout, published by its owner, is listed; an entry reused starts with none."""
    ref = make(table, 1)
    first = table.get(ref)
    assert first is not None and first.timeout == 0
    table.publish_timeout(ref.entry, 120)
    [flow] = table.list_flows()
    assert flow.timeout == 120 and flow.last_activity == 101.0 and flow.target == host_side(1)
    for bad in (-1, 1 << 32):
        with pytest.raises(FlowTableError):
            table.publish_timeout(ref.entry, bad)
    with pytest.raises(FlowTableError):
        table.publish_timeout(8, 30)
    assert table.remove_many([ref]) == 1
    again = make(table, 2)
    assert again.entry == ref.entry and table.list_flows()[0].timeout == 0
    assert table.check() == []


def test_capacity_exhaustion(table: FlowTable) -> None:
    """The ninth flow of an 8-entry table is refused; one removal makes room again."""
    refs = [make(table, n) for n in range(8)]
    with pytest.raises(TableFullError):
        table.alloc()
    assert table.pending is None
    assert table.counters()["free"] == 0 and table.check() == []
    table.remove(refs[3])
    make(table, 100)
    assert table.check() == []


def _colliding(table: FlowTable, home: int, count: int) -> list[int]:
    """Flow numbers ``n`` whose guest-side key has home bucket ``home`` (host sides elsewhere)."""
    store = table._store
    found = []
    for n in range(100000):
        if store.bucket(pack_key(FlowType.UDP, guest_side(n))) != home:
            continue
        host_home = store.bucket(pack_key(FlowType.UDP, host_side(n)))
        if host_home not in (home, (home + 1) % store.index_size, (home + 2) % store.index_size):
            found.append(n)
            if len(found) == count:
                return found
    raise AssertionError("no colliding keys found")


@pytest.mark.parametrize("where", ["middle", "wrap"])
def test_collisions_and_backward_shift_deletion(table: FlowTable, where: str) -> None:
    """Keys sharing a home bucket form one cluster; deleting from it keeps the rest reachable.

    With ``wrap`` the home bucket is the last one, so the cluster wraps around the index end.
    """
    size = table._store.index_size
    assert size == Geometry.for_capacity(8).index_size
    home = size - 1 if where == "wrap" else 3
    numbers = _colliding(table, home, 3)
    refs = [make(table, n) for n in numbers]
    index = table._store._idx
    occupied = [(home + k) % size for k in range(3)]
    assert [index[b] - 1 for b in occupied] == [2 * r.entry for r in refs]   # one cluster, in order
    table.remove(refs[0])                   # the hole at home is filled by the next member
    assert index[home] - 1 == 2 * refs[1].entry
    for n, ref in zip(numbers[1:], refs[1:]):
        hit = table.lookup(FlowType.UDP, guest_side(n))
        assert hit is not None and hit.ref == ref
    assert table.check() == []
    table.remove(refs[2])
    table.remove(refs[1])
    assert table.check() == [] and table.counters()["active"] == 0


def test_random_churn_keeps_the_index_sound() -> None:
    """Many inserts and removals in a crowded index; check() after each batch."""
    import random

    rnd = random.Random(7)
    with FlowTable.create(capacity=32) as table:
        live: dict[int, FlowRef] = {}
        for step in range(600):
            n = rnd.randrange(48)
            if n in live:
                assert table.remove(live.pop(n))
            elif len(live) < 32:
                live[n] = make(table, n)
            if step % 50 == 0:
                assert table.check() == []
        for n, ref in live.items():
            hit = table.lookup(FlowType.UDP, host_side(n))
            assert hit is not None and hit.ref == ref
        assert table.check() == []


def test_check_reports_corruption(table: FlowTable) -> None:
    """check() notices a counter, an index member and a free-list link that are wrong."""
    from shardswitch.shm.layout import HeaderWord

    ref = make(table, 1)
    words = table._words
    words[HeaderWord.N_ACTIVE] += 1
    assert any("counter active" in p for p in table.check())
    words[HeaderWord.N_ACTIVE] -= 1
    store = table._store
    store._idx[store.bucket(store.key_of(ref.entry, 0))] = 0      # lose side 0
    problems = table.check()
    assert any("side 0 is not in the index" in p for p in problems), problems


def test_attach_refuses_missing_instance() -> None:
    """Attaching an instance this process neither created nor inherited fails cleanly (there is nothing to
    open by name), as does attaching one that was closed."""
    with pytest.raises(FlowTableError, match="never opened by name"):
        FlowTable.attach("0123456789abcdef")
    with pytest.raises(FlowTableError):
        FlowTable.attach("bad/name")
    closed = FlowTable.create(capacity=4)
    closed.close()
    with pytest.raises(FlowTableError):
        FlowTable.attach(closed.instance)


def test_participant_slots_are_limited_and_released() -> None:
    """With every slot taken attach() fails cleanly; close() frees the slot and cancels its allocation."""
    with FlowTable.create(capacity=4, max_participants=2) as table:
        instance = table.instance
        other = FlowTable.attach(instance)
        with pytest.raises(FlowTableError):
            FlowTable.attach(instance)
        other.alloc()
        assert table.counters()["in_progress"] == 1
        other.close()
        assert table.counters()["in_progress"] == 0
        FlowTable.attach(instance).close()
        assert table.check() == []


def test_guest6_published_for_every_process() -> None:
    """The guest's IPv6 address: None until published; what one handle publishes another reads; a writer
    that died in the middle of its store (odd sequence) reads as None until the next publish."""
    from shardswitch.shm.layout import GUEST6_SEQ_WORD

    with FlowTable.create(capacity=64) as first, FlowTable.attach(first.instance) as second:
        assert second.guest6() is None
        addr = bytes.fromhex("20010db8000200000000000000000015")
        first.publish_guest6(addr)
        assert second.guest6() == addr
        other = bytes.fromhex("20010db80002000050540000fe123456")
        second.publish_guest6(other)
        assert first.guest6() == other
        with pytest.raises(ValueError, match="16 bytes"):
            first.publish_guest6(b"short")
        first._words[GUEST6_SEQ_WORD] |= 1
        assert second.guest6() is None
        first.publish_guest6(addr)
        assert second.guest6() == addr and first._words[GUEST6_SEQ_WORD] % 2 == 0
