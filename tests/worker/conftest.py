"""Fixtures shared by the worker tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shardswitch.shm.table import FlowTable

#: Entries of the tables the worker tests create.
TABLE_CAPACITY = 64


@pytest.fixture
def table() -> Iterator[FlowTable]:
    """A small flow table of this test's own, closed afterwards."""
    t = FlowTable.create(capacity=TABLE_CAPACITY)
    yield t
    t.close()
