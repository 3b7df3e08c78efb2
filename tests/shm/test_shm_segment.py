"""Segment life cycle across processes: create, attach, unlink; stale instances replaced, live refused."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import multiprocess
import posix_ipc
import pytest

from shardswitch.shm import FlowSide, FlowTable, FlowType, InstanceInUseError, Pif, ip16
from shardswitch.shm.segment import names_for

DEV_SHM = Path("/dev/shm")


def leftovers(instance: str) -> list[str]:
    """The /dev/shm files of ``instance`` (segment ``shardswitch-NAME.flows``, ``sem.shardswitch-NAME.*``)."""
    return sorted(p.name for p in DEV_SHM.iterdir() if f"shardswitch-{instance}." in p.name)


SIDES = (FlowSide(Pif.GUEST, ip16("10.0.0.2"), 5000, ip16("10.0.0.1"), 53),
         FlowSide(Pif.HOST, ip16("10.0.0.1"), 53, ip16("127.0.0.1"), 45000))


def _attach_and_add(instance: str, done: Any) -> None:
    """Child: attach by name, create one flow, close."""
    table = FlowTable.attach(instance)
    ref = table.alloc()
    table.set_initiator(ref, SIDES[0])
    table.set_target(ref, SIDES[1])
    table.set_type(ref, FlowType.UDP, 1)
    table.activate(ref)
    table.close()
    done.set()


def _create_and_wait(instance: str, ready: Any) -> None:
    """Child: create the instance, say so, and wait to be killed."""
    FlowTable.create(instance, capacity=16)
    ready.set()
    time.sleep(60)


def test_create_attach_unlink_leaves_nothing(instance: str, children: list[Any]) -> None:
    """A worker attaches by name and sees the same table; unlink removes segment and semaphores."""
    table = FlowTable.create(instance, capacity=16)
    assert leftovers(instance) == sorted([f"shardswitch-{instance}.flows"] + [
        f"sem.shardswitch-{instance}.{sem}" for sem in ("mutex", "room", "turnstile")])
    done = multiprocess.Event()
    child = multiprocess.Process(target=_attach_and_add, args=(instance, done))
    children.append(child)
    child.start()
    child.join(20)
    assert child.exitcode == 0 and done.is_set()
    hit = table.lookup(FlowType.UDP, SIDES[1])
    assert hit is not None and hit.owner == 1
    assert table.lock_state()["participants"] == {os.getpid(): "IDLE"}    # the child unregistered
    assert table.check() == []
    table.unlink()
    assert leftovers(instance) == []


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_stale_instance_is_replaced(instance: str, children: list[Any], reap: bool) -> None:
    """The segment of a SIGKILLed creator (reaped or still a zombie) is replaced at the next create."""
    ready = multiprocess.Event()
    child = multiprocess.Process(target=_create_and_wait, args=(instance, ready))
    children.append(child)
    child.start()
    assert ready.wait(20)
    os.kill(child.pid, signal.SIGKILL)
    if reap:
        child.join(5)
    else:
        deadline = time.monotonic() + 5     # wait for the zombie state without reaping it
        while b") Z " not in Path(f"/proc/{child.pid}/stat").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(leftovers(instance)) == 4
    with FlowTable.create(instance, capacity=32) as table:
        assert table.capacity == 32 and table.counters()["free"] == 32
        assert table.lock_state()["participants"] == {os.getpid(): "IDLE"}
        assert table.list_flows() == [] and table.check() == []
    assert leftovers(instance) == []


def test_live_instance_is_refused(instance: str, children: list[Any]) -> None:
    """create() refuses a name whose creator still runs, and succeeds once it is gone."""
    ready = multiprocess.Event()
    child = multiprocess.Process(target=_create_and_wait, args=(instance, ready))
    children.append(child)
    child.start()
    assert ready.wait(20)
    with pytest.raises(InstanceInUseError):
        FlowTable.create(instance, capacity=16)
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)
    FlowTable.create(instance, capacity=16).unlink()
    assert leftovers(instance) == []


def test_leftover_semaphores_without_segment_are_replaced(instance: str) -> None:
    """Semaphores left by a start interrupted before the segment existed do not block a create."""
    names = names_for(instance)
    stuck = posix_ipc.Semaphore(names.room, posix_ipc.O_CREX, initial_value=0)
    stuck.close()
    with FlowTable.create(instance, capacity=4) as table:
        assert table.lock_state()["semaphores"] == (1, 1, 1)
        assert table.list_flows() == []
    assert leftovers(instance) == []
