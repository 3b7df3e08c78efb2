"""Echo-flow timers: activity published once a second, idle flows expire after 60 s.

A real worker attached to a real flow table; the clock is the ``now`` the
test passes to the deferred handler.  The flow's host socket is a stand-in
(the expiry path only closes it).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from shardswitch.ipc import Channel, ToWorker, WorkerSetup
from shardswitch.net.params import GuestParams
from shardswitch.shm.layout import FlowSide, FlowType, Pif, ip16, pack_key
from shardswitch.shm.table import FlowTable
from shardswitch.worker.worker import Worker
from shardswitch.worker.ping import PING_TIMEOUT, PingFlow


@pytest.fixture
def worker(table: FlowTable) -> Iterator[Worker]:
    """Worker 0 attached to ``table``."""
    peer, ours = socket.socketpair()
    params = GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2")
    w = Worker(WorkerSetup(pair=0, params=params, flow_table=table.instance), Channel(ours, ToWorker))
    yield w
    w.flows.close_all()
    assert w.table is not None
    w.table.close()
    w.epoll.close()
    ours.close()
    peer.close()


def add_flow(w: Worker, ident: int, now: float) -> PingFlow:
    """Enter an echo flow as the worker does, with a stand-in socket."""
    guest = FlowSide(Pif.GUEST, ip16("10.0.2.15"), ident, ip16("10.0.2.2"), 0)
    host = FlowSide(Pif.HOST, ip16("127.0.0.1"), 0, bytes(16), 40000 + ident)
    assert w.table is not None
    ref = w.table.enter(FlowType.PING4, guest, host, w.pair, now)
    assert ref is not None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    flow = PingFlow(ref=ref, ftype=FlowType.PING4, key=pack_key(FlowType.PING4, guest), last=now, sock=sock,
                    guest_ident=ident, guest_addr=ip16("10.0.2.15"), remote=ip16("10.0.2.2"))
    w.flows.add(flow, sock.fileno())
    return flow


def test_idle_flow_expires_after_timeout(worker: Worker, table: FlowTable) -> None:
    """Alive at 59 s of idleness, gone (socket closed, entry freed) past 60 s."""
    flow = add_flow(worker, 1, now=1000.0)
    worker.flows.tick(1000.0 + PING_TIMEOUT - 1)
    assert len(table.list_flows()) == 1 and not flow.sock._closed  # type: ignore[attr-defined]
    fd = flow.sock.fileno()
    worker.flows.tick(1000.0 + PING_TIMEOUT + 1)
    assert table.list_flows() == [] and worker.flows.flows == {}
    assert flow.sock.fileno() == -1 and fd not in worker.sockets


def test_activity_keeps_flow_and_is_published(worker: Worker, table: FlowTable) -> None:
    """A flow used recently survives; its last activity reaches the table at the next tick."""
    flow = add_flow(worker, 2, now=1000.0)
    flow.last = 1050.0                       # what a request at t=1050 does
    worker.flows.tick(1000.0 + PING_TIMEOUT + 1)
    (entry,) = table.list_flows()
    assert entry.last_activity == 1050.0
    worker.flows.tick(1050.0 + PING_TIMEOUT + 1)
    assert table.list_flows() == []


def test_only_own_flows_are_visited(worker: Worker, table: FlowTable) -> None:
    """A flow another worker owns is never expired by this worker's deferred handler."""
    other = table.alloc()
    table.set_initiator(other, FlowSide(Pif.GUEST, ip16("10.0.2.15"), 9, ip16("10.0.2.2"), 0))
    table.set_target(other, FlowSide(Pif.HOST, ip16("127.0.0.1"), 0, bytes(16), 40009))
    table.set_type(other, FlowType.PING4, 1)
    table.activate(other, 0.0)
    worker.flows.tick(10_000.0)
    assert [f.owner for f in table.list_flows()] == [1]
