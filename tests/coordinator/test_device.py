"""Device layer: validation and ring life cycle, with a fake worker pool."""

from __future__ import annotations

import os

import pytest

from shardswitch.coordinator.device import NO_FD, Device, DeviceError
from shardswitch.ipc import MemAdd, MemClear, RingStart, RingStarted, RingStop, RingStopped
from shardswitch.vhost.wire import MemRegion, VirtioFeature, VringAddr

BASE = 0x7F00_0000_0000
REGION = MemRegion(guest_phys_addr=0, memory_size=1 << 20, userspace_addr=BASE, mmap_offset=0)


class FakeWorkers:
    """Records what the device sends; answers like a healthy worker."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, object]] = []
        self.positions: dict[int, int] = {}

    def send(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = ()) -> bool:
        self.sent.append((pair, message))
        return True

    def call(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = ()) -> object | None:
        self.sent.append((pair, message))
        if isinstance(message, RingStart):
            self.positions[message.index] = message.last_avail
            return RingStarted(seq=message.seq, index=message.index)
        if isinstance(message, RingStop):
            return RingStopped(seq=message.seq, index=message.index,
                               last_avail=self.positions.get(message.index, 0) + 7)
        return None


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK)


def memfd() -> int:
    return os.memfd_create("test")


@pytest.fixture
def dev() -> Device:
    d = Device(2, FakeWorkers())
    d.set_features(int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.EVENT_IDX))
    return d


def configure(dev: Device, index: int, addr: VringAddr | None = None) -> None:
    dev.set_mem_table([REGION], [memfd()])
    dev.set_vring_num(index, 256)
    dev.set_vring_base(index, 0)
    dev.set_vring_addr(addr or VringAddr(index, 0, BASE + 0x1000, BASE + 0x3000, BASE + 0x2000, 0))
    dev.set_vring_kick(index, eventfd())
    dev.set_vring_call(index, eventfd())


def starts(dev: Device) -> list[RingStart]:
    return [m for _p, m in dev.workers.sent if isinstance(m, RingStart)]  # type: ignore[attr-defined]


def test_ring_starts_only_when_enabled(dev: Device) -> None:
    configure(dev, 3)
    assert not starts(dev)
    dev.set_vring_enable(3, 1)
    (start,) = starts(dev)
    assert (start.index, start.num, start.has_kick, start.has_call) == (3, 256, True, True)
    assert dev.workers.sent[-1][0] == 1  # type: ignore[attr-defined]  # vring 3 belongs to pair 1


def test_get_vring_base_answers_worker_position(dev: Device) -> None:
    configure(dev, 0)
    dev.set_vring_enable(0, 1)
    assert dev.get_vring_base(0) == 7
    assert not dev.vrings[0].started and dev.vrings[0].kick_fd == NO_FD


@pytest.mark.parametrize("index", [4, 5, 255])
def test_vring_index_out_of_range(dev: Device, index: int) -> None:
    with pytest.raises(DeviceError, match="out of range"):
        dev.set_vring_num(index, 256)


@pytest.mark.parametrize("num", [0, 3, 100, 65536])
def test_ring_size_must_be_power_of_two(dev: Device, num: int) -> None:
    with pytest.raises(DeviceError, match="power of two"):
        dev.set_vring_num(0, num)


def test_ring_outside_memory_does_not_start(dev: Device) -> None:
    configure(dev, 1, VringAddr(1, 0, BASE + (1 << 20) - 16, BASE + 0x3000, BASE + 0x2000, 0))
    dev.set_vring_enable(1, 1)
    assert not starts(dev)
    assert "outside guest memory" in dev.vrings[1].error


def test_misaligned_ring_does_not_start(dev: Device) -> None:
    configure(dev, 1, VringAddr(1, 0, BASE + 0x1008, BASE + 0x3000, BASE + 0x2000, 0))
    dev.set_vring_enable(1, 1)
    assert not starts(dev)
    assert "aligned" in dev.vrings[1].error


def test_mem_table_needs_one_fd_per_region(dev: Device) -> None:
    with pytest.raises(DeviceError, match="descriptors"):
        dev.set_mem_table([REGION, MemRegion(1 << 20, 4096, BASE + (1 << 20), 0)], [memfd()])


def test_overlapping_regions_refused(dev: Device) -> None:
    with pytest.raises(DeviceError, match="overlap"):
        dev.set_mem_table([REGION, MemRegion(4096, 4096, BASE + (2 << 20), 0)], [memfd(), memfd()])


def test_add_mem_reg_deduplicated(dev: Device) -> None:
    for _ in range(4):
        dev.add_mem_region(REGION, [memfd()])
    assert len(dev.regions) == 1
    assert sum(isinstance(m, MemAdd) for _p, m in dev.workers.sent) == 2  # type: ignore[attr-defined]  # once per worker


def test_new_mem_table_restarts_running_rings(dev: Device) -> None:
    configure(dev, 2)
    dev.set_vring_enable(2, 1)
    dev.set_mem_table([REGION], [memfd()])
    assert isinstance(dev.workers.sent[-1][1], RingStart)  # type: ignore[attr-defined]
    assert any(isinstance(m, MemClear) for _p, m in dev.workers.sent)  # type: ignore[attr-defined]
    assert dev.vrings[2].started


def test_unoffered_features_refused(dev: Device) -> None:
    with pytest.raises(DeviceError, match="not offered"):
        dev.set_features(int(VirtioFeature.GUEST_UFO))


def test_reset_stops_everything(dev: Device) -> None:
    configure(dev, 0)
    dev.set_vring_enable(0, 1)
    dev.reset()
    assert not dev.regions and not any(r.started for r in dev.vrings)
    assert dev.vrings[0].kick_fd == NO_FD
