"""Stress: four processes create, look up and remove the same flows concurrently.

The key space (64 flows) is larger than the table (48 entries) and shared by
all processes, so they keep creating the SAME flows at the same time
(duplicate refusal: activate() hands the loser the winner), find flows others
created, remove flows others are about to remove (stale references), and run
into a full table.  Between ``set_type`` and ``activate`` a process sometimes
yields the CPU, to widen the window in which two processes hold allocations
for the same flow; a refusal of a flow that was absent just before ``alloc``
("raced") proves that window was hit.  Each process also runs check() now and then while the
others work.  Afterwards the table must be sound: no duplicate keys, every
entry either reachable from the index (both sides) or on the free list,
counters in agreement.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from typing import Any

import multiprocess

from shardswitch.shm import (FlowSide, FlowTable, FlowType, Pif, TableFullError, ip16, pack_key)

PROCESSES = 4
SECONDS = 2.0
KEYS = 64
CAPACITY = 48


def guest_side(n: int) -> FlowSide:
    """Guest side of flow ``n`` (IPv6 for odd ``n``, IPv4 for even)."""
    guest = ip16(f"fd00::{n + 2:x}") if n % 2 else ip16(bytes([10, 0, 1, n]))
    return FlowSide(Pif.GUEST, guest, 3000 + n, ip16("2001:db8::1" if n % 2 else "203.0.113.9"), 443)


def host_side(n: int) -> FlowSide:
    """Host side of flow ``n``."""
    return FlowSide(Pif.HOST, guest_side(n).our_addr, 443, ip16("::1" if n % 2 else "127.0.0.1"), 20000 + n)


def _hammer(instance: str, seed: int, start_at: float, results: Any) -> None:
    """Child: random creates, lookups and removals until SECONDS after ``start_at``."""
    table = FlowTable.attach(instance)
    rnd = random.Random(seed)
    stats: Counter[str] = Counter()
    problems: list[str] = []
    guest_keys = [pack_key(FlowType.TCP, guest_side(n)) for n in range(KEYS)]
    host_keys = [pack_key(FlowType.TCP, host_side(n)) for n in range(KEYS)]
    while time.monotonic() < start_at:
        time.sleep(0.001)
    end = start_at + SECONDS
    while time.monotonic() < end:
        n = rnd.randrange(KEYS)
        roll = rnd.random()
        if roll < 0.4:
            absent = table.lookup_key(guest_keys[n]) is None
            try:
                ref = table.alloc()
            except TableFullError:
                stats["full"] += 1
                continue
            table.set_initiator(ref, guest_side(n))
            table.set_target(ref, host_side(n))
            table.set_type(ref, FlowType.TCP, seed)
            if rnd.random() < 0.3:
                time.sleep(0)
            won = table.activate(ref)
            if won == ref:
                stats["created"] += 1
            else:
                table.cancel(ref)
                stats["refused"] += 1
                stats["raced"] += absent        # someone created it between our lookup and activate
        elif roll < 0.75:
            by_guest = table.lookup_key(guest_keys[n])
            by_host = table.lookup_key(host_keys[n])
            stats["found" if by_guest or by_host else "missed"] += 1
            for hit, side in ((by_guest, 0), (by_host, 1)):
                if hit is not None and hit.side != side:
                    problems.append(f"flow {n} found on side {hit.side}, expected {side}")
        elif roll < 0.98:
            hit = table.lookup_key(host_keys[n])
            if hit is not None:
                stats["removed" if table.remove(hit.ref) else "stale"] += 1
        else:
            found = table.check()
            problems += found
            stats["checks"] += 1
    table.close()
    results.put((dict(stats), problems))


def test_four_processes_on_the_same_flows() -> None:
    """Concurrent creates/lookups/removals leave a sound table; duplicates were really refused."""
    table = FlowTable.create(capacity=CAPACITY)
    instance = table.instance
    results = multiprocess.Queue()
    start_at = time.monotonic() + 0.3
    procs = [multiprocess.Process(target=_hammer, args=(instance, seed, start_at, results))
             for seed in range(PROCESSES)]
    try:
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=SECONDS + 30) for _ in procs]
        for proc in procs:
            proc.join(10)
            assert proc.exitcode == 0
    finally:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(5)
    total: Counter[str] = Counter()
    for stats, problems in outcomes:
        assert problems == []
        total.update(stats)
    assert total["created"] > 100 and total["raced"] > 0 and total["removed"] > 0
    assert total["full"] > 0 and total["checks"] > 0
    assert table.check() == []
    counters = table.counters()
    flows = table.list_flows()
    assert counters["active"] == len(flows) and counters["in_progress"] == 0
    assert counters["active"] + counters["free"] == CAPACITY
    assert counters["activations"] == total["created"] and counters["removals"] == total["removed"]
    assert counters["duplicates"] == total["refused"]
    keys = {(flow.initiator, flow.target) for flow in flows}
    assert len(keys) == len(flows)                       # one flow per key, whoever made it
    for flow in flows:
        for side in (flow.initiator, flow.target):
            hit = table.lookup(FlowType.TCP, side)
            assert hit is not None and hit.ref == flow.ref
    state = table.lock_state()
    assert state["readers"] == 0 and state["semaphores"] == (1, 1, 1)
    assert state["participants"] == {os.getpid(): "IDLE"}
    table.close()
