"""Shared flow table benchmark: operation rates alone and contended, and the lock's own cost.

Theory of operation
-------------------
One table of the default capacity (131071 flows, about 18 MB of shared
memory) is created for the run.  For 1, 2 and 4 processes (children started
with ``multiprocess``, forked after the creation and each attached to the table
it inherited, as workers are) three phases
run back to back, separated by a barrier:

* ``insert``: the full creation life cycle (alloc, set_initiator, set_target,
  set_type, activate: two short write locks) for flows of the process's own
  key range, until the phase time is up or its share of the capacity is used;
* ``lookup``: read-locked lookups of the flows it inserted, alternately by
  the guest-side and by the host-side key (keys packed beforehand, as a
  worker would build them from a frame);
* ``remove``: write-locked removal of those flows, one call per flow, until
  the phase time is up or none is left.

A phase's rate is all processes' operations divided by the wall time from the
first process's start to the last one's end (CLOCK_MONOTONIC is system-wide),
so 2 and 4 processes show what contention leaves of the aggregate rate.  The
machine has 2 CPUs: with 4 processes, two wait for a CPU at any time.

Lock cost (in this process, uncontended): read acquire+release, write
acquire+release, and for reference :meth:`FlowTable.touch` (no lock) and one
key hash.

``run(seconds)`` takes about ``3 * seconds + 2`` s: each phase lasts
``seconds / 3`` (at least 0.2 s).  ``python -m bench.flowtable [seconds]``
prints the rows.
"""

from __future__ import annotations

import queue
import sys
import time
import timeit
from typing import Any

import multiprocess

from shardswitch.shm import FlowRef, FlowSide, FlowTable, FlowType, Pif, ip16, pack_key

#: Process counts measured.
PROCESS_COUNTS = (1, 2, 4)
#: Phases, in order.
PHASES = ("insert", "lookup", "remove")


def _sides(n: int) -> tuple[FlowSide, FlowSide]:
    """Guest and host side of flow number ``n`` (both keys distinct for every n < 2**24)."""
    low = bytes([n >> 16 & 255, n >> 8 & 255, n & 255])
    return (FlowSide(Pif.GUEST, ip16(b"\x0a" + low), 40000, ip16("198.51.100.1"), 443),
            FlowSide(Pif.HOST, ip16("198.51.100.1"), 443, ip16(b"\xac" + low), 40000))


def _row(case: str, processes: int, ops: int, seconds: float) -> dict[str, Any]:
    """One result row."""
    return {"case": case, "processes": processes, "ops": ops, "seconds": round(seconds, 4),
            "ops_per_s": ops / seconds if seconds > 0 else 0.0,
            "ns_per_op": 1e9 * seconds / ops if ops else 0.0}


def _phase_worker(instance: str, rank: int, share: int, phase_seconds: float, barrier: Any,
                  results: Any) -> None:
    """Child: run the three phases on its own key range; report (phase, ops, start, end)."""
    table = FlowTable.attach(instance)
    first = rank * share
    sides = [_sides(n) for n in range(first, first + share)]
    keys = [pack_key(FlowType.UDP, side) for pair in sides for side in pair]
    refs: list[FlowRef] = []
    now = time.monotonic

    barrier.wait()
    start = now()
    deadline = start + phase_seconds
    for guest, host in sides:
        ref = table.alloc()
        table.set_initiator(ref, guest)
        table.set_target(ref, host)
        table.set_type(ref, FlowType.UDP, rank)
        won = table.activate(ref, start)
        if won != ref:
            raise RuntimeError(f"flow {first + len(refs)} exists already")
        refs.append(ref)
        if now() >= deadline:
            break
    results.put(("insert", len(refs), start, now()))

    barrier.wait()
    lookup = table.lookup_key
    probe = keys[:2 * len(refs)]
    done = 0
    start = now()
    deadline = start + phase_seconds
    at = 0
    while now() < deadline:
        batch = probe[at:at + 512]
        for key in batch:
            lookup(key)
        done += len(batch)
        at = at + 512 if at + 512 < len(probe) else 0
    results.put(("lookup", done, start, now()))

    barrier.wait()
    remove = table.remove
    done = 0
    start = now()
    deadline = start + phase_seconds
    for ref in refs:
        remove(ref)
        done += 1
        if done % 64 == 0 and now() >= deadline:
            break
    results.put(("remove", done, start, now()))
    table.close()


def _collect(results: Any, procs: list[Any], count: int, timeout: float) -> list[Any]:
    """``count`` reports from ``results``; fails early if a child died."""
    deadline = time.monotonic() + timeout
    reports: list[Any] = []
    while len(reports) < count:
        try:
            reports.append(results.get(timeout=0.2))
        except queue.Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs) or time.monotonic() > deadline:
                raise RuntimeError("a benchmark process failed") from None
    return reports


def contended(processes: int, phase_seconds: float) -> list[dict[str, Any]]:
    """The three phase rates with ``processes`` processes on one fresh table."""
    rows: list[dict[str, Any]] = []
    with FlowTable.create() as table:
        instance = table.instance
        share = (table.capacity - 16) // processes
        barrier = multiprocess.Barrier(processes)
        results = multiprocess.Queue()
        procs = [multiprocess.Process(target=_phase_worker,
                                      args=(instance, rank, share, phase_seconds, barrier, results))
                 for rank in range(processes)]
        for proc in procs:
            proc.start()
        try:
            reports = _collect(results, procs, 3 * processes, 30 + 4 * phase_seconds)
        finally:
            for proc in procs:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
        if table.check():
            raise RuntimeError(f"table inconsistent after the benchmark: {table.check()[:3]}")
    for phase in PHASES:
        mine = [r for r in reports if r[0] == phase]
        ops = sum(r[1] for r in mine)
        wall = max(r[3] for r in mine) - min(r[2] for r in mine)
        rows.append(_row(phase, processes, ops, wall))
    return rows


def lock_costs(seconds: float) -> list[dict[str, Any]]:
    """Uncontended lock acquire+release (read, write), touch and one hash, in this process."""
    rows: list[dict[str, Any]] = []
    with FlowTable.create(capacity=1024) as table:
        lock = table._lock          # the lock alone, without any table work around it
        store = table._store
        key = pack_key(FlowType.UDP, _sides(1)[0])

        def read() -> None:
            """One read acquire+release."""
            lock.acquire_read()
            lock.release_read()

        def write() -> None:
            """One write acquire+release."""
            lock.acquire_write()
            lock.release_write()

        def touch() -> None:
            """One activity update."""
            table.touch(5, 1.0)

        def hash_key() -> None:
            """One key hash."""
            store.bucket(key)

        for name, func in (("read lock acquire+release", read), ("write lock acquire+release", write),
                           ("touch (no lock)", touch), ("key hash (blake2b)", hash_key)):
            timer = timeit.Timer(func)
            number, took = timer.autorange()
            number = max(number, int(number * (seconds / 4) / max(took, 1e-6)))
            took = min(timer.repeat(repeat=3, number=number))
            rows.append(_row(name, 1, number, took))
    return rows


def run(seconds: float) -> list[dict[str, Any]]:
    """Every figure; about ``3 * seconds + 2`` s of wall time."""
    phase_seconds = max(0.2, seconds / 3)
    rows = lock_costs(min(1.0, seconds / 4))
    for processes in PROCESS_COUNTS:
        rows += contended(processes, phase_seconds)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a table."""
    lines = [f"  {'flow table':<28} {'procs':>5} {'ops/s':>11} {'ns/op':>9}"]
    for row in rows:
        lines.append(f"  {row['case']:<28} {row['processes']:>5} {row['ops_per_s']:>11,.0f} "
                     f"{row['ns_per_op']:>9,.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_rows(run(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0)))
