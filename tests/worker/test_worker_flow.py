"""The generic flow layer on a real shared table: find or hand over, enter, descriptors, timers, closing.

A tiny protocol (:class:`RecordingHooks`) plugs into :class:`FlowLayer` on a
stand-in worker, so the layer's own behaviour is seen without a protocol's.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shardswitch.net.drop import DropReason, PacketError
from shardswitch.net.params import GuestParams
from shardswitch.shm.layout import FlowSide, FlowType, Pif, ip16
from shardswitch.shm.table import FlowTable
from shardswitch.worker.counters import Event
from shardswitch.worker.flow import NO_REF, FlowBase, FlowLayer, HandOver, NewFlow
from shardswitch.worker.fwd import Forwarding
from tests.worker.conftest import TABLE_CAPACITY
from tests.worker.standin import StandInWorker

PARAMS = GuestParams(address="10.0.2.15", prefix_len=24, gateway="10.0.2.2")


def guest_side(port: int) -> FlowSide:
    """The guest side of a UDP flow from the guest's ``port`` to 10.0.2.2:53."""
    return FlowSide(Pif.GUEST, ip16("10.0.2.15"), port, ip16("10.0.2.2"), 53)


def host_side(port: int) -> FlowSide:
    """A host side for the same flow."""
    return FlowSide(Pif.HOST, ip16("127.0.0.1"), 53, ip16("127.0.0.1"), 40000 + port)


@dataclass(slots=True, eq=False, kw_only=True)
class ToyFlow(FlowBase):
    """A flow of the toy protocol: over once ``done`` is set."""

    done: bool = False


class RecordingHooks:
    """A protocol that records what the layer asks of it."""

    table_full = DropReason.UDP_TABLE_FULL
    conflict = DropReason.UDP_FLOW_CONFLICT

    def __init__(self) -> None:
        """Nothing seen yet."""
        self.ready: list[FlowBase] = []
        self.released: list[FlowBase] = []
        self.aborted: list[FlowBase] = []
        self.deferred_calls = 0

    def on_socket(self, flow: ToyFlow) -> None:
        """Record readiness."""
        self.ready.append(flow)

    def timer(self, flow: ToyFlow, now: float) -> bool:
        """Over when the test says so."""
        return flow.done

    def release(self, flow: ToyFlow) -> None:
        """Record the release."""
        self.released.append(flow)

    def deferred(self, now: float) -> None:
        """Count the calls."""
        self.deferred_calls += 1

    def abort(self, flow: ToyFlow) -> None:
        """Record the abort."""
        self.aborted.append(flow)


@pytest.fixture
def rig(table: FlowTable) -> Iterator[tuple[StandInWorker, FlowLayer, RecordingHooks]]:
    """A flow layer of queue pair 0 on ``table``, with the toy protocol for UDP."""
    w = StandInWorker(PARAMS)
    layer = FlowLayer(w, table, Forwarding(w))
    hooks = RecordingHooks()
    layer.register((FlowType.UDP,), hooks)
    yield w, layer, hooks
    layer.close_all()
    w.close()


def new_flow(layer: FlowLayer, port: int, now: float = 100.0, fd: int = -1) -> ToyFlow:
    """Find (absent), enter and add one toy flow."""
    found = layer.find(FlowType.UDP, guest_side(port))
    assert isinstance(found, NewFlow)
    ref = layer.enter(FlowType.UDP, guest_side(port), host_side(port), now)
    flow = ToyFlow(ref=ref, ftype=FlowType.UDP, key=found.key, last=now)
    layer.add(flow, fd)
    return flow


def test_find_enter_add_then_find_locally(rig: tuple[StandInWorker, FlowLayer, RecordingHooks],
                                          table: FlowTable) -> None:
    """A new flow is entered (owner: this pair) and then found in the local index, without the table."""
    _w, layer, _hooks = rig
    flow = new_flow(layer, 1000)
    (entry,) = table.list_flows()
    assert entry.owner == 0 and entry.ref == flow.ref
    assert layer.find(FlowType.UDP, guest_side(1000)) is flow
    assert layer.count() == 1


def test_socket_readiness_reaches_the_protocol_with_the_flow(
        rig: tuple[StandInWorker, FlowLayer, RecordingHooks]) -> None:
    """add() watches the flow's socket; readiness calls on_socket with the flow itself."""
    w, layer, hooks = rig
    ours, theirs = socket.socketpair()
    try:
        flow = new_flow(layer, 1001, fd=ours.fileno())
        theirs.send(b"x")
        w.poll()
        assert hooks.ready == [flow] and layer.by_fd == {ours.fileno(): flow}
        layer.close(flow)
        assert ours.fileno() not in w.sockets and layer.by_fd == {}
    finally:
        ours.close()
        theirs.close()


def test_flow_of_another_worker_is_handed_over(rig: tuple[StandInWorker, FlowLayer, RecordingHooks],
                                               table: FlowTable) -> None:
    """find() raises HandOver with the owner's queue pair for a flow another worker entered."""
    _w, layer, _hooks = rig
    assert table.enter(FlowType.UDP, guest_side(1002), host_side(1002), 1, 100.0) is not None
    with pytest.raises(HandOver) as handed:
        layer.find(FlowType.UDP, guest_side(1002))
    assert handed.value.owner == 1


def test_stale_entry_of_this_pair_is_removed(rig: tuple[StandInWorker, FlowLayer, RecordingHooks],
                                             table: FlowTable) -> None:
    """An entry of this pair that the local index lacks (a previous process's) is removed: the flow is new."""
    _w, layer, _hooks = rig
    assert table.enter(FlowType.UDP, guest_side(1003), host_side(1003), 0, 100.0) is not None
    assert isinstance(layer.find(FlowType.UDP, guest_side(1003)), NewFlow)
    assert table.list_flows() == []


def test_lost_race(rig: tuple[StandInWorker, FlowLayer, RecordingHooks], table: FlowTable) -> None:
    """A twin entered first by another worker: HandOver for a guest flow, the conflict drop for a host flow."""
    _w, layer, hooks = rig
    assert table.enter(FlowType.UDP, guest_side(1004), host_side(1004), 1, 100.0) is not None
    with pytest.raises(HandOver) as handed:
        layer.enter(FlowType.UDP, guest_side(1004), host_side(1004), 100.0)
    assert handed.value.owner == 1
    with pytest.raises(PacketError) as refused:
        layer.enter(FlowType.UDP, host_side(1004), guest_side(1004), 100.0)
    assert refused.value.reason is hooks.conflict


def test_full_table_is_the_protocols_drop(rig: tuple[StandInWorker, FlowLayer, RecordingHooks]) -> None:
    """No free entry: PacketError with the protocol's table_full reason, nothing left half-entered."""
    _w, layer, hooks = rig
    with pytest.raises(PacketError) as full:
        for port in range(2000, 2100):
            new_flow(layer, port)
    assert full.value.reason is hooks.table_full and layer.count() == TABLE_CAPACITY


def test_tick_expires_in_one_batch_and_publishes_activity(rig: tuple[StandInWorker, FlowLayer, RecordingHooks],
                                                          table: FlowTable) -> None:
    """Flows whose timer says over are released and leave the table; the others' activity reaches it."""
    _w, layer, hooks = rig
    over, alive = new_flow(layer, 1005), new_flow(layer, 1006)
    over.done = True
    alive.last = 150.0
    layer.tick(200.0)
    assert hooks.released == [over] and over.closed and layer.count() == 1
    (entry,) = table.list_flows()
    assert entry.ref == alive.ref and entry.last_activity == 150.0 and alive.published == 150.0
    assert hooks.deferred_calls == 1


def test_a_flow_closed_by_another_timer_is_skipped(rig: tuple[StandInWorker, FlowLayer, RecordingHooks]) -> None:
    """A timer that closes another flow of the same pass: that flow's timer is not run."""
    _w, layer, hooks = rig
    first, second = new_flow(layer, 1009), new_flow(layer, 1010)
    timed: list[FlowBase] = []

    def timer(flow: ToyFlow, now: float) -> bool:
        """The first flow's timer closes the second."""
        timed.append(flow)
        if flow is first:
            layer.close(second)
        return False

    hooks.timer = timer  # type: ignore[method-assign]
    layer.tick(200.0)
    assert timed == [first] and second.closed and layer.count() == 1


def test_close_and_close_all(rig: tuple[StandInWorker, FlowLayer, RecordingHooks], table: FlowTable) -> None:
    """close() leaves the table at once; close_all() releases every flow and leaves the table to the coordinator."""
    _w, layer, hooks = rig
    first, second = new_flow(layer, 1007), new_flow(layer, 1008)
    layer.close(first)
    layer.close(first)                                   # twice is harmless
    assert [e.ref for e in table.list_flows()] == [second.ref] and hooks.released == [first]
    layer.close_all()
    assert hooks.released == [first, second] and layer.flows == {} and len(table.list_flows()) == 1


def test_without_a_table_every_flow_is_local() -> None:
    """No table (one worker under test): dummy references, no hand-over."""
    w = StandInWorker(PARAMS)
    layer = FlowLayer(w, None, Forwarding(w))
    layer.register((FlowType.UDP,), RecordingHooks())
    assert isinstance(layer.find(FlowType.UDP, guest_side(1)), NewFlow)
    assert layer.enter(FlowType.UDP, guest_side(1), host_side(1), 0.0) == NO_REF
    w.close()


def test_new_flows_get_the_policys_target(rig: tuple[StandInWorker, FlowLayer, RecordingHooks],
                                          table: FlowTable) -> None:
    """find() answers a new flow with where it goes; a refused one raises before the table is asked."""
    _w, layer, _hooks = rig
    found = layer.find(FlowType.UDP, FlowSide(Pif.GUEST, ip16("10.0.2.15"), 5, ip16("192.0.2.1"), 53))
    assert isinstance(found, NewFlow) and (found.target, found.port) == (ip16("192.0.2.1"), 53)
    table.close()          # a refused flow never reaches the table (closed: any use would raise)
    with pytest.raises(PacketError) as refused:
        layer.find(FlowType.UDP, FlowSide(Pif.GUEST, ip16("10.0.2.15"), 5, ip16("127.0.0.1"), 53))
    assert refused.value.reason is DropReason.FLOW_DST_LOOPBACK


def test_a_faulty_socket_handler_costs_its_flow_only(rig: tuple[StandInWorker, FlowLayer, RecordingHooks],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """on_socket raising: the flow is aborted and closed, counted and logged with its traceback; the other
    flow, whose socket is ready in the same poll, is served."""
    w, layer, hooks = rig
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        bad = new_flow(layer, 1011, fd=pairs[0][0].fileno())
        good = new_flow(layer, 1012, fd=pairs[1][0].fileno())

        def on_socket(flow: ToyFlow) -> None:
            """A bug in the protocol, for one flow."""
            if flow is bad:
                raise ValueError("a bug")
            hooks.ready.append(flow)

        hooks.on_socket = on_socket  # type: ignore[method-assign]
        for _ours, theirs in pairs:
            theirs.send(b"x")
        w.poll()
        assert hooks.ready == [good] and hooks.aborted == [bad] and bad.closed and not good.closed
        assert w.counters.events[Event.FLOW_FAULT] == 1 and layer.count() == 1
        assert "ValueError: a bug" in caplog.text
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_faulty_timers_cost_their_flow_only(rig: tuple[StandInWorker, FlowLayer, RecordingHooks]) -> None:
    """A timer or a deferred hook raising: that flow is closed, the pass goes on, the deferred hook's fault is
    counted; a second fault of an abort is contained too."""
    w, layer, hooks = rig
    bad, good = new_flow(layer, 1013), new_flow(layer, 1014)
    good.done = True

    def timer(flow: ToyFlow, now: float) -> bool:
        """Raise for one flow."""
        if flow is bad:
            raise KeyError("timer bug")
        return flow.done

    def failing(*_args: object) -> None:
        """Raise always."""
        raise RuntimeError("bug")

    hooks.timer = timer  # type: ignore[method-assign]
    hooks.abort = failing  # type: ignore[method-assign]
    hooks.deferred = failing  # type: ignore[method-assign]
    layer.tick(200.0)
    assert bad.closed and good.closed and layer.count() == 0 and hooks.released == [bad, good]
    assert w.counters.events[Event.FLOW_FAULT] == 1 and w.counters.events[Event.HANDLER_FAULT] == 1
