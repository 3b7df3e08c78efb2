"""Fixtures shared by the flow-table tests: unique instance names, child processes cleaned up."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import posix_ipc
import pytest

from shardswitch.shm.segment import names_for


@pytest.fixture
def instance() -> Iterator[str]:
    """A unique instance name; whatever a test leaves behind is unlinked afterwards."""
    name = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    names = names_for(name)
    for unlink, obj in ((posix_ipc.unlink_shared_memory, names.segment),
                        *((posix_ipc.unlink_semaphore, sem) for sem in names.semaphores)):
        try:
            unlink(obj)
        except posix_ipc.ExistentialError:
            pass


@pytest.fixture
def children() -> Iterator[list[Any]]:
    """Processes a test starts; any still running at the end are killed."""
    started: list[Any] = []
    yield started
    for proc in started:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
