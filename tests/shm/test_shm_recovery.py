"""Crash recovery: a process SIGKILLed inside the lock, and the processes blocked behind it go on.

Each test stops a child at a test-only hook point (:class:`HookPoint`) where it
holds (part of) the lock, starts other processes that then block on the lock,
kills the child, lets this process (the registered "coordinator") recover, and
checks that the blocked processes finish and the table and the lock are sound.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import multiprocess
import pytest

from shardswitch.shm import (FlowRef, FlowSide, FlowTable, FlowTableError, FlowType, HookPoint, Pif,
                             ip16)

#: How long blocked processes get to prove they are blocked, and to finish after recovery.
BLOCKED_FOR = 0.3
FINISH_WITHIN = 15.0


def guest_side(n: int) -> FlowSide:
    """Guest side of flow ``n``."""
    return FlowSide(Pif.GUEST, ip16(bytes([10, 0, 0, n])), 2000 + n, ip16("192.0.2.1"), 7)


def host_side(n: int) -> FlowSide:
    """Host side of flow ``n``."""
    return FlowSide(Pif.HOST, ip16("192.0.2.1"), 7, ip16("198.51.100.1"), 30000 + n)


def make(table: FlowTable, n: int) -> FlowRef:
    """Create flow ``n`` (owner n % 4)."""
    ref = table.alloc()
    table.set_initiator(ref, guest_side(n))
    table.set_target(ref, host_side(n))
    table.set_type(ref, FlowType.UDP, n % 4)
    won = table.activate(ref)
    if won != ref:
        table.cancel(ref)
    return won


# -- child process bodies ----------------------------------------------------------------------


def _stopper(point: HookPoint, ready: Any) -> Callable[[HookPoint], None]:
    """A hook that, at ``point``, tells the test and then waits to be killed."""
    def hook(reached: HookPoint) -> None:
        """Stop here if this is the point."""
        if reached == point:
            ready.set()
            time.sleep(120)
    return hook


def _stop_in(instance: str, action: str, point: HookPoint, ready: Any) -> None:
    """Child: attach and run ``action`` until it stops at ``point``."""
    table = FlowTable.attach(instance)
    table.set_hook(_stopper(point, ready))
    if action == "remove":
        hit = table.lookup(FlowType.UDP, guest_side(0))
        assert hit is not None
        table.remove(hit.ref)
    elif action == "create":
        make(table, 20)
    elif action == "list":
        table.list_flows()
    elif action == "lookup":
        table.lookup(FlowType.UDP, guest_side(1))
    elif action == "alloc":
        table.alloc()
    elif action == "alloc-only":
        table.set_hook(None)
        table.alloc()
        ready.set()
        time.sleep(120)


def _waiter(instance: str, role: str, n: int, results: Any) -> None:
    """Child: one read (look flow ``n`` up) or one write (create flow ``n``), then report."""
    table = FlowTable.attach(instance)
    if role == "write":
        ref = make(table, n)
        results.put((role, n, ref.entry))
    else:
        hit = table.lookup(FlowType.UDP, host_side(n))
        results.put((role, n, None if hit is None else hit.entry))
    table.close()


# -- the scenario ------------------------------------------------------------------------------


def _scenario(children: list[Any], action: str, point: HookPoint,
              waiters: list[tuple[str, int]], reap_first: bool = True) -> tuple[FlowTable, str, list[Any]]:
    """Populate, stop a child at ``point``, start blocked ``waiters``, kill, recover.

    Returns the coordinator's table, the recovery text and the waiters' results.
    """
    table = FlowTable.create(capacity=64)
    instance = table.instance
    for n in range(10):
        make(table, n)
    ready = multiprocess.Event()
    victim = multiprocess.Process(target=_stop_in, args=(instance, action, point, ready))
    children.append(victim)
    victim.start()
    assert ready.wait(20), "the child never reached its hook point"
    results = multiprocess.Queue()
    for role, n in waiters:
        proc = multiprocess.Process(target=_waiter, args=(instance, role, n, results))
        children.append(proc)
        proc.start()
        time.sleep(0.1)                      # in order: the first waiter queues first
    time.sleep(BLOCKED_FOR)
    assert results.empty(), "a waiter got through while the lock was held"
    with pytest.raises(FlowTableError):
        table.recover(victim.pid)            # still alive: refused
    os.kill(victim.pid, signal.SIGKILL)
    if reap_first:
        victim.join(5)
    else:                                    # recover while it is a zombie
        deadline = time.monotonic() + FINISH_WITHIN
        while victim.pid not in table.dead_participants():
            assert time.monotonic() < deadline, "the killed child never looked dead"
            time.sleep(0.01)
    text = table.recover(victim.pid, timeout=FINISH_WITHIN)
    got = [results.get(timeout=FINISH_WITHIN) for _ in waiters]
    for proc in children[1:]:
        proc.join(FINISH_WITHIN)
        assert proc.exitcode == 0
    victim.join(5)
    return table, text, got


def _assert_sound(table: FlowTable) -> None:
    """Table consistent, lock idle, only this process registered."""
    assert table.check() == []
    state = table.lock_state()
    assert state["readers"] == 0 and state["writer_pid"] == 0 and state["mutation_pid"] == 0
    assert state["semaphores"] == (1, 1, 1)
    assert isinstance(state["epoch"], int) and state["epoch"] % 2 == 0
    assert state["participants"] == {os.getpid(): "IDLE"}
    assert table.counters()["in_progress"] == 0


def _present(table: FlowTable, n: int) -> bool:
    """Whether flow ``n`` is in the table, found from both sides."""
    by_guest = table.lookup(FlowType.UDP, guest_side(n))
    by_host = table.lookup(FlowType.UDP, host_side(n))
    assert (by_guest is None) == (by_host is None)
    return by_guest is not None and by_host is not None and by_guest.ref == by_host.ref


# -- tests ---------------------------------------------------------------------------------------


def test_writer_killed_in_the_middle_of_a_removal(children: list[Any]) -> None:
    """Killed with the write lock held and the index half updated: the removal is completed."""
    table, text, got = _scenario(children, "remove", HookPoint.REMOVE_HALF,
                                 [("write", 30), ("read", 5)])
    assert "phase W_HELD" in text and "discarded entry" in text and "(interrupted remove)" in text
    assert "rebuilt index" in text and "released its write lock" in text
    assert sorted(role for role, _n, _e in got) == ["read", "write"]
    hit = table.lookup(FlowType.UDP, host_side(5))
    assert hit is not None and ("read", 5, hit.entry) in got
    assert not _present(table, 0)
    assert all(_present(table, n) for n in [*range(1, 10), 30])
    _assert_sound(table)
    table.close()


def test_writer_killed_in_the_middle_of_an_activation(children: list[Any]) -> None:
    """Killed with one side of a new flow in the index: the half-made flow is discarded."""
    table, text, _got = _scenario(children, "create", HookPoint.ACTIVATE_HALF,
                                  [("read", 3), ("write", 31)])
    assert "phase W_HELD" in text and "(interrupted activate)" in text
    assert not _present(table, 20)
    assert all(_present(table, n) for n in [*range(10), 31])
    assert table.counters()["free"] == 64 - 11
    _assert_sound(table)
    table.close()


def test_reader_killed_holding_the_read_lock(children: list[Any]) -> None:
    """Killed inside a listing: its reader exit is run for it; the queued writer and reader go on."""
    table, text, got = _scenario(children, "list", HookPoint.READ_HELD,
                                 [("write", 32), ("read", 7)])
    assert "phase R_HELD" in text and "released its read lock" in text
    assert "reset" not in text
    assert len(got) == 2 and _present(table, 32)
    _assert_sound(table)
    table.close()


@pytest.mark.parametrize("action, point", [("lookup", HookPoint.READ_COUNTED),
                                           ("alloc", HookPoint.WRITE_TURNSTILE)],
                         ids=["reader-counted", "writer-turnstile"])
def test_killed_in_a_transitional_phase(children: list[Any], action: str,
                                        point: HookPoint) -> None:
    """Killed between a semaphore operation and its bookkeeping: the lock is reset exactly.

    Recovery runs while the victim is still an unreaped zombie.
    """
    table, text, got = _scenario(children, action, point,
                                 [("write", 33), ("read", 2), ("write", 34)], reap_first=False)
    assert "reset the lock" in text
    assert len(got) == 3 and _present(table, 33) and _present(table, 34)
    _assert_sound(table)
    table.close()


def test_dead_process_allocation_in_progress_is_freed(children: list[Any]) -> None:
    """A process killed between alloc() and activate() holds no lock; its entry is reclaimed."""
    table, text, _got = _scenario(children, "alloc-only", HookPoint.READ_HELD,
                                  [])
    assert "phase IDLE" in text and "cancelled 1 in-progress allocation" in text
    assert table.counters()["free"] == 64 - 10
    _assert_sound(table)
    table.close()
