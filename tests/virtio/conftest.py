"""Fixtures shared by the virtqueue tests: one memfd seen from the driver and the device side."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from ringhelper import SharedMemory

from shardswitch.virtio.memory import GuestMemory


@pytest.fixture
def shm() -> Iterator[SharedMemory]:
    """A 1 MiB memfd (driver view)."""
    s = SharedMemory()
    yield s
    s.close()


@pytest.fixture
def mem(shm: SharedMemory) -> Iterator[GuestMemory]:
    """The device's view of the same memfd."""
    m = GuestMemory()
    shm.attach(m)
    yield m
    m.clear()
