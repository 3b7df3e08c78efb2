"""Fixtures shared by the worker tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shardswitch.frontend.client import VhostUserFrontend
from shardswitch.shm.table import FlowTable
from tests.guest.netns import TestNetns
from tests.switch import Switch
from tests.switchkit import ready_frontend, start_server
from tests.worker.tcpkit import SERVERS

#: Entries of the tables the worker tests create.
TABLE_CAPACITY = 64


@pytest.fixture
def table() -> Iterator[FlowTable]:
    """A small flow table of this test's own, closed afterwards."""
    t = FlowTable.create(capacity=TABLE_CAPACITY)
    yield t
    t.close()


@pytest.fixture
def servers() -> str:
    """The servers (a Python script) a module's switch has on its namespace's loopback; a module overrides
    this fixture to run its own."""
    return SERVERS


@pytest.fixture
def switch(tmp_path: Path, netns: TestNetns, servers: str) -> Iterator[Switch]:
    """A 2-worker switch in the test namespace, with ``servers`` listening on its loopback (modules that need
    another switch define their own)."""
    start_server(netns, servers)
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([])) as sw:
        yield sw


@pytest.fixture
def fe(switch: Switch) -> Iterator[VhostUserFrontend]:
    """A connected front-end with RX buffers on both pairs."""
    with ready_frontend(switch, rx=200) as frontend:
        yield frontend
