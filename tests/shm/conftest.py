"""Fixtures shared by the flow-table tests: child processes cleaned up."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def children() -> Iterator[list[Any]]:
    """Processes a test starts; any still running at the end are killed."""
    started: list[Any] = []
    yield started
    for proc in started:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
