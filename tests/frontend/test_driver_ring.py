"""DriverRing against a tiny in-test device that reads the memfd directly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shardswitch.frontend.memory import GuestRam
from shardswitch.frontend.vring import DriverRing, RingError, RingFullError

from .ringdev import INDIRECT, NEXT, WRITE, DeviceMemory, DeviceRing

MIB = 1 << 20


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    """A small guest RAM split like QEMU's, to exercise mmap_offset translation."""
    with GuestRam(8 * MIB, split=0xC0000, hole=0x20000) as guest_ram:
        yield guest_ram


def make(ram: GuestRam, num: int = 8, *, event_idx: bool = True, indirect: bool = False,
         base: int = 0, buf_size: int = 2048) -> tuple[DriverRing, DeviceRing]:
    """A driver ring and the device's view of it."""
    ring = DriverRing(ram, num, event_idx=event_idx, indirect=indirect, base=base, buf_size=buf_size)
    dev = DeviceRing(DeviceMemory(ram.fd, ram.regions), num, ring.desc_vva, ring.avail_vva,
                     ring.used_vva, base)
    return ring, dev


def test_layout_and_initial_state(ram: GuestRam) -> None:
    """Areas are aligned, addressed by front-end virtual address, and start at base."""
    ring, dev = make(ram, 16, base=40000)
    assert ring.desc_gpa % 16 == 0 and ring.used_gpa % 4 == 0 and ring.avail_gpa % 2 == 0
    assert ring.desc_vva == ram.gpa_to_vva(ring.desc_gpa)
    assert dev.avail_idx == 40000 and ring.avail_idx == 40000 and ring.last_used == 40000
    assert ring.used_idx == 40000 and dev.used_event == 40000
    assert ring.free_count == 16 and ring.in_flight == 0


@pytest.mark.parametrize("num", [0, 3, 65536])
def test_bad_queue_size(ram: GuestRam, num: int) -> None:
    """Queue sizes must be powers of two up to 32768."""
    with pytest.raises(RingError):
        DriverRing(ram, num, event_idx=False)


def test_out_chain_visible_only_after_publish(ram: GuestRam) -> None:
    """A readable chain reaches the device with its data once avail.idx is stored."""
    ring, dev = make(ram)
    head = ring.add_out(b"frame-data")
    assert dev.pop() is None
    ring.publish()
    assert dev.pop() == head
    assert dev.walk(head) == [(dev.walk(head)[0][0], 10, 0)]
    assert dev.read_chain(head) == b"frame-data"
    dev.push(head, 0)
    assert ring.get_used() == [(head, 0, b"")]
    assert ring.free_count == 8


def test_list_and_long_data_use_several_descriptors(ram: GuestRam) -> None:
    """A list gives one descriptor per item; data longer than buf_size is split."""
    ring, dev = make(ram, buf_size=64)
    head = ring.add_out([b"hdr", b"x" * 150])
    ring.publish()
    assert dev.pop() == head
    chain = dev.walk(head)
    assert [n for _a, n, _f in chain] == [3, 64, 64, 22]
    assert all(f == NEXT for _a, _n, f in chain[:-1]) and chain[-1][2] == 0
    assert dev.read_chain(head) == b"hdr" + b"x" * 150
    assert ring.free_count == 4


def test_in_chain_returns_written_data(ram: GuestRam) -> None:
    """Writable segments come back truncated to the used length, across segments."""
    ring, dev = make(ram, buf_size=32)
    head = ring.add_in([20, 40])
    ring.publish()
    assert dev.pop() == head
    assert [(n, f) for _a, n, f in dev.walk(head)] == [(20, WRITE | NEXT), (32, WRITE | NEXT), (8, WRITE)]
    payload = bytes(range(50))
    dev.push(head, dev.write_chain(head, payload))
    assert ring.get_used() == [(head, 50, payload)]


def test_indirect_chains(ram: GuestRam) -> None:
    """Indirect chains take one table slot; the table holds the real descriptors."""
    ring, dev = make(ram, 4, indirect=True, buf_size=16)
    out = ring.add_out([b"a" * 20, b"b"], indirect=True)
    inn = ring.add_in([8, 8], indirect=True)
    ring.publish()
    assert ring.free_count == 2
    assert dev.pop() == out and dev.pop() == inn
    addr, length, flags, _next = dev.descriptor(out)
    assert flags == INDIRECT and length == 3 * 16
    assert dev.read_chain(out) == b"a" * 20 + b"b"
    assert [f for _a, _n, f in dev.walk(inn)] == [WRITE | NEXT, WRITE]
    dev.push(inn, dev.write_chain(inn, b"0123456789"))
    dev.push(out, 0)
    assert ring.get_used() == [(inn, 10, b"0123456789"), (out, 0, b"")]
    assert ring.free_count == 4


def test_indirect_needs_the_feature(ram: GuestRam) -> None:
    """Indirect chains are refused when the ring was not set up for them."""
    ring, _dev = make(ram)
    with pytest.raises(RingError):
        ring.add_out(b"x", indirect=True)


def test_full_ring_changes_nothing(ram: GuestRam) -> None:
    """RingFullError leaves the ring untouched; freed descriptors are reusable."""
    ring, dev = make(ram, 4)
    heads = [ring.add_out(b"p") for _ in range(3)]
    with pytest.raises(RingFullError):
        ring.add_out([b"a", b"b"])
    assert ring.free_count == 1 and ring.avail_idx == 3
    with pytest.raises(RingError):
        ring.add_out([b"x"] * 5)                 # longer than the queue: never fits
    ring.publish()
    for head in heads:
        assert dev.pop() == head
        dev.push(head, 0)
    assert len(ring.get_used()) == 3
    ring.add_out([b"a", b"b", b"c", b"d"])


def test_buffers_are_recycled(ram: GuestRam) -> None:
    """Many round trips do not consume more guest memory after the first batch."""
    ring, dev = make(ram, 8)
    ring.add_out(b"warm-up")
    ring.publish()
    dev.push(dev.pop_head(), 0)
    ring.get_used()
    before = ram.allocated
    for i in range(200):
        head = ring.add_in([100])
        ring.publish()
        assert dev.pop() == head
        dev.push(head, dev.write_chain(head, bytes([i % 256]) * 100))
        assert ring.get_used()[0][2] == bytes([i % 256]) * 100
    assert ram.allocated == before


def test_wrap_around_at_65535(ram: GuestRam) -> None:
    """Free-running indices wrap from 65535 to 0; elements are found at idx % num."""
    ring, dev = make(ram, 4, base=65530)
    seen = []
    for round_ in range(6):
        heads = [ring.add_in([64]) for _ in range(4)]
        ring.publish()
        popped = [dev.pop_head() for _ in range(4)]
        assert popped == heads and dev.pop() is None
        for head in reversed(popped):                 # device completes out of order
            dev.push(head, dev.write_chain(head, bytes([head, round_])), publish=False)
        dev.publish_used()
        used = ring.get_used()
        assert [u[0] for u in used] == list(reversed(heads))
        assert all(data == bytes([head, round_]) for head, _n, data in used)
        seen.append(ring.last_used)
    assert seen == [65534, 2, 6, 10, 14, 18]
    assert dev.avail_idx == 18 and ring.avail_idx == 18 and ring.in_flight == 0


def test_event_idx_kick_decisions(ram: GuestRam) -> None:
    """Kick exactly when the published range crossed avail_event, across the wrap."""
    ring, dev = make(ram, 8, base=65533)
    dev.set_avail_event(65533)
    ring.add_out(b"a")
    ring.publish()                                   # 65533 -> 65534, event 65533 crossed
    assert ring.needs_kick()
    assert not ring.needs_kick()                     # nothing new since the last decision
    dev.set_avail_event(65535)
    ring.add_out(b"b")
    ring.publish()                                   # 65534 -> 65535: event 65535 not reached
    assert not ring.needs_kick()
    for _ in range(3):
        ring.add_out(b"c")
    ring.publish()                                   # 65535 -> 2 crosses 65535
    assert ring.needs_kick()
    dev.set_avail_event(5)
    ring.add_out(b"d")
    ring.publish()                                   # 2 -> 3, event 5 ahead
    assert not ring.needs_kick()


def test_kick_without_event_idx_follows_no_notify(ram: GuestRam) -> None:
    """Without EVENT_IDX the driver kicks unless used.flags says NO_NOTIFY."""
    ring, dev = make(ram, 8, event_idx=False)
    dev.set_avail_event(12345)                       # ignored without EVENT_IDX
    ring.add_out(b"a")
    ring.publish()
    assert ring.needs_kick()
    dev.set_used_flags(1)
    ring.add_out(b"b")
    ring.publish()
    assert not ring.needs_kick()


def test_interrupt_suppression(ram: GuestRam) -> None:
    """EVENT_IDX moves used_event; without it avail.flags carries NO_INTERRUPT."""
    ring, dev = make(ram, 8, base=0)
    ring.suppress_interrupts(True)
    assert dev.used_event == 0xFFFF                  # last_used - 1: next crossing 64K away
    ring.add_out(b"x")
    ring.publish()
    dev.push(dev.pop_head(), 0)
    ring.get_used()
    assert dev.used_event == 0xFFFF                  # not re-armed while suppressed
    ring.suppress_interrupts(False)
    assert dev.used_event == 1 and not ring.has_used()
    ring.add_out(b"y")
    ring.publish()
    dev.push(dev.pop_head(), 0)
    assert ring.has_used()
    ring.get_used()
    assert dev.used_event == 2                       # re-armed by get_used

    plain, pdev = make(ram, 8, event_idx=False)
    plain.suppress_interrupts(True)
    assert pdev.avail_flags == 1
    plain.suppress_interrupts(False)
    assert pdev.avail_flags == 0


def test_raw_descriptors(ram: GuestRam) -> None:
    """Arbitrary entries land verbatim; the head is made available and freed when used."""
    ring, dev = make(ram, 8)
    ring.add_raw_descriptors([(0xDEAD_BEEF_0000, 0xFFFF_FFFF, NEXT | WRITE, 6), (1, 2, INDIRECT, 7)], head=5)
    ring.add_raw_descriptors([], head=999)           # out-of-range head, untracked
    ring.publish()
    assert ring.free_count == 6
    assert dev.descriptor(5) == (0xDEAD_BEEF_0000, 0xFFFF_FFFF, NEXT | WRITE, 6)
    assert dev.descriptor(6) == (1, 2, INDIRECT, 7)
    assert dev.pop() == 5 and dev.pop() == 999
    with pytest.raises(RingError):
        ring.add_raw_descriptors([(0, 0, 0, 0)], head=6)   # slot held by the raw chain
    with pytest.raises(RingError):
        ring.add_raw_descriptors([(0, 0, 0, 0)] * 2, head=7)  # past the table
    dev.push(5, 4096)                                # length not checked for raw chains
    assert ring.get_used() == [(5, 4096, b"")]
    assert ring.free_count == 8


@pytest.mark.parametrize("bug", ["unknown_id", "too_long", "duplicate", "too_many"])
def test_device_protocol_violations(ram: GuestRam, bug: str) -> None:
    """A misbehaving device gets RingError and nothing is consumed."""
    ring, dev = make(ram, 8)
    first = ring.add_in([16])
    second = ring.add_in([16])
    ring.publish()
    dev.pop()
    dev.pop()
    if bug == "unknown_id":
        dev.push(7, 0)
    elif bug == "too_long":
        dev.push(first, 17)
    elif bug == "duplicate":
        dev.push(first, 0, publish=False)
        dev.push(first, 0)
    else:
        for head in (first, second, first):
            dev.push(head, 0, publish=False)
        dev.publish_used()
    with pytest.raises(RingError):
        ring.get_used()
    assert ring.last_used == 0 and ring.in_flight == 2 and second != first
