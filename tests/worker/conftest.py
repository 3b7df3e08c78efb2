"""Fixtures shared by the worker tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from shardswitch.shm.table import FlowTable

#: Entries of the tables the worker tests create.
TABLE_CAPACITY = 64


@pytest.fixture
def table() -> Iterator[FlowTable]:
    """A small flow table of this test's own, unlinked afterwards."""
    t = FlowTable.create(f"wtest{os.getpid()}-{uuid.uuid4().hex[:8]}", capacity=TABLE_CAPACITY)
    yield t
    t.unlink()
