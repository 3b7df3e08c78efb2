"""``make bench``: run the benchmarks, print a table, write bench/results/latest.json.

Theory of operation
-------------------
Four parts, configured from the environment:

* in-process references (:mod:`bench.primitives`): the raw cost of the ring
  primitives and of the worker's packet path without processes, each for
  ``BENCH_SECONDS / 6`` seconds;
* frame-rate cases (:mod:`bench.frames`): for 1 and 2 workers and every ring
  size in ``BENCH_RINGS``, 64-byte frames reflected, 64-byte ARP requests
  answered (the normal path), and 1500-byte frames reflected; each in a
  fresh switch, ``BENCH_WARMUP`` seconds of warm-up then ``BENCH_SECONDS``
  measured;
* 64-byte frames from DPDK testpmd (:mod:`bench.testpmd`, txonly through
  its virtio-user port) into shardswitch (1 and 2 queue pairs) and, with
  ``PASST_BIN``, passt: frames per second and each back-end's CPU;
* TCP streams through the workers (:mod:`bench.tcpstream`): one flow per
  queue pair from our Python front-end to a host socket, 1 and 2 workers,
  each direction, with each worker's CPU per GB (no QEMU: the figure that
  shows whether workers scale);
* the shared flow table (:mod:`bench.flowtable`): operations per second in one
  process and contended by 2 and 4, lock costs;
* a real guest (:mod:`bench.guest`): shardswitch beside QEMU's user networking
  and, when ``PASST_BIN`` names a vhost-user passt, passt, measured in the same
  run (iperf3 both ways with the back-end's CPU per GB moved, connections per
  second, ping); ``BENCH_GUEST=0`` skips it, ``BENCH_PROFILE=1`` adds a py-spy
  profile of shardswitch during each direction;
* live migration (:mod:`bench.migration`): the guest-visible gap, QEMU's
  downtime and the total time of a migration between two shardswitches (1 and
  2 queue pairs) and, with ``PASST_BIN``, between two passts;
  ``BENCH_MIGRATION=0`` skips it.

Variables: ``BENCH_SECONDS`` (default 3), ``BENCH_WARMUP`` (default 0.5),
``BENCH_RINGS`` (comma-separated ring sizes, default ``256,1024``),
``BENCH_WORKERS`` (comma-separated worker counts, default ``1,2``),
``BENCH_GUEST``, ``BENCH_PROFILE``, ``BENCH_MIGRATION``, ``PASST_BIN``.  With the defaults the
whole run takes about eight minutes, most of it the real guests.

A case that fails is reported and the run goes on; the exit status is then 1.
The machine is usually shared, so the load average at the start is printed
and stored with the results: compare figures only between quiet runs.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import flowtable, guest, migration, tcpstream, testpmd
from bench.frames import BenchError, Case, CaseResult, run_case
from bench.primitives import Reference, run_references

#: Where the results go.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_FILE = RESULTS_DIR / "latest.json"
#: Frame sizes per path, in table order.
CASE_KINDS = (("reflect", 64), ("arp", 64), ("reflect", 1500))


class ConfigError(ValueError):
    """An environment variable has an unusable value."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What the environment asked for."""

    seconds: float
    warmup: float
    rings: tuple[int, ...]
    workers: tuple[int, ...]

    @property
    def reference_seconds(self) -> float:
        """Wall time of each in-process reference."""
        return max(0.2, self.seconds / 6)


def _number(name: str, default: float) -> float:
    """A positive number from the environment variable ``name``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{name}={text!r} must be positive")
    return value


def _int_list(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """Comma-separated positive integers from the environment variable ``name``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a comma-separated list of integers") from None
    if not values or min(values) <= 0:
        raise ConfigError(f"{name}={text!r} must list positive integers")
    return values


def settings_from_env() -> Settings:
    """Read BENCH_SECONDS, BENCH_WARMUP, BENCH_RINGS and BENCH_WORKERS."""
    return Settings(seconds=_number("BENCH_SECONDS", 3.0), warmup=_number("BENCH_WARMUP", 0.5),
                    rings=_int_list("BENCH_RINGS", (256, 1024)),
                    workers=_int_list("BENCH_WORKERS", (1, 2)))


def cases_for(settings: Settings) -> list[Case]:
    """Every frame-rate case, in table order."""
    return [Case(mode, size, workers, ring)
            for workers in settings.workers for ring in settings.rings for mode, size in CASE_KINDS]


# -- output --------------------------------------------------------------------

def _rate(value: float) -> str:
    """A frame rate with thousands separators."""
    return f"{value:,.0f}"


def format_references(refs: list[Reference]) -> str:
    """The in-process reference table."""
    lines = ["In-process references (one process, no eventfds; timed code only)",
             f"  {'what':<30} {'frame':>5} {'frames/s':>11} {'ns/frame':>9}"]
    for ref in refs:
        lines.append(f"  {ref.name:<30} {ref.frame_size:>5} {_rate(ref.fps):>11} {ref.ns_per_frame:>9.0f}")
    return "\n".join(lines)


def _drops(result: CaseResult) -> str:
    """All workers' drops during the interval, compactly."""
    total: dict[str, int] = {}
    for worker in result.workers:
        for reason, count in worker.drops.items():
            total[reason] = total.get(reason, 0) + count
    return ",".join(f"{k}:{v}" for k, v in sorted(total.items())) or "-"


#: Header of the frame-rate table.
CASES_HEADER = "\n".join([
    "Frame rate, TX ring -> worker -> RX ring (reflect: frame back; arp: request in, reply out)",
    f"  {'path':<8} {'frame':>5} {'wkr':>3} {'ring':>5} {'frames/s':>11} {'per pair':<21} "
    f"{'Mbit/s in':>9} {'wkr CPU':>7} {'frames/wkr-CPU-s':>16} {'drv CPU':>7} {'others':>6} "
    f"{'stalls':>6}  drops"])
#: Footer of the frame-rate table.
CASES_FOOTER = "\n".join([
    "  frames/s: frames received on the RX ring(s); Mbit/s in: of the frames sent; wkr CPU: all",
    "  workers, 100% = one CPU; frames/wkr-CPU-s: the workers' own RX frames per second of their",
    "  CPU time (driver-independent); drv CPU: the busiest driver (near 100% = the driver was the",
    "  limit); others: CPU used by other programs meanwhile (high = figures disturbed); stalls:",
    "  driver waits of 20 ms without any progress (on a busy machine: the worker got no CPU)."])


def format_case(item: CaseResult | tuple[Case, str]) -> str:
    """One row of the frame-rate table (a failed case shows its error)."""
    if isinstance(item, tuple):
        case, error = item
        return (f"  {case.mode:<8} {case.frame_size:>5} {case.workers:>3} {case.ring_size:>5} "
                f"FAILED: {error.splitlines()[0] if error else '?'}")
    case = item.case
    per_pair = " + ".join(_rate(p.rx_fps) for p in item.pairs) if len(item.pairs) > 1 else ""
    mbit = item.rx_fps * case.frame_size * 8 / 1e6
    return (f"  {case.mode:<8} {case.frame_size:>5} {case.workers:>3} {case.ring_size:>5} "
            f"{_rate(item.rx_fps):>11} {per_pair:<21} {mbit:>9.0f} "
            f"{item.worker_cpu * 100:>6.0f}% {_rate(item.frames_per_worker_cpu_s):>16} "
            f"{item.driver_cpu * 100:>6.0f}% {item.other_cpu * 100:>5.0f}% "
            f"{sum(p.timeouts for p in item.pairs):>6}  {_drops(item)}")


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _meta(settings: Settings, load: tuple[float, float, float]) -> dict[str, Any]:
    """Where and how the figures were taken."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "load_average_at_start": list(load),
            "seconds": settings.seconds, "warmup": settings.warmup, "rings": list(settings.rings),
            "workers": list(settings.workers), "reference_seconds": settings.reference_seconds}


def write_results(path: Path, meta: dict[str, Any], refs: list[Reference],
                  results: list[CaseResult | tuple[Case, str]], flow_table: list[dict[str, Any]],
                  guest_results: dict[str, Any]) -> None:
    """Write everything measured as JSON."""
    cases: list[dict[str, Any]] = []
    for item in results:
        if isinstance(item, tuple):
            case, error = item
            cases.append({"case": {"mode": case.mode, "frame_size": case.frame_size, "workers": case.workers,
                                   "ring_size": case.ring_size}, "error": error})
        else:
            cases.append(item.as_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "references": [r.as_dict() for r in refs], "cases": cases, "flow_table": flow_table,
            "guest": guest_results}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main() -> int:
    """Run everything; 0 when every case succeeded."""
    try:
        settings = settings_from_env()
    except ConfigError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    load = os.getloadavg()
    started = time.monotonic()
    print(f"shardswitch bench: {settings.seconds:g} s per case after {settings.warmup:g} s warm-up, "
          f"rings {'/'.join(map(str, settings.rings))}; {os.cpu_count()} CPUs ({_cpu_model()}), "
          f"load average {load[0]:.2f} at start", flush=True)
    refs = run_references(settings.reference_seconds)
    print(format_references(refs), flush=True)
    print(CASES_HEADER, flush=True)
    results: list[CaseResult | tuple[Case, str]] = []
    with tempfile.TemporaryDirectory(prefix="shardswitch-bench-") as tmp:
        for case in cases_for(settings):
            item: CaseResult | tuple[Case, str]
            try:
                item = run_case(case, settings.seconds, settings.warmup, Path(tmp))
            except BenchError as exc:
                item = (case, str(exc))
            results.append(item)
            print(format_case(item), flush=True)
    print(CASES_FOOTER)
    print("\n64-byte frames from DPDK testpmd (txonly, virtio-user), each back-end in this run:", flush=True)
    print(testpmd.HEADER, flush=True)
    pmd_results = testpmd.run(max(settings.seconds, 3.0), guest.passt_binary()[0])
    print(f"\nTCP streams, one flow per queue pair, our front-end as the guest ({os.cpu_count()} CPUs shared by the "
          "drivers, the host peers and the workers):", flush=True)
    print(tcpstream.HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="shardswitch-bench-") as tmp:
        stream_results = tcpstream.run(max(settings.seconds, 4.0), settings.warmup + 0.5, Path(tmp), settings.workers)
    print("\nflow table (shared memory, semaphore readers-writer lock):", flush=True)
    table_rows = flowtable.run(settings.seconds)
    print(flowtable.format_rows(table_rows), flush=True)
    guest_results: dict[str, Any] = {}
    if os.environ.get("BENCH_GUEST", "1") != "0":
        print("\nreal guest (TCG), every back-end in this run; PASST_BIN names a vhost-user passt:", flush=True)
        print(guest.HEADER, flush=True)
        guest_results = guest.run(max(2, int(settings.seconds)))
        print("\n".join(guest.ratios(guest_results)), flush=True)
    migration_results: dict[str, Any] = {}
    if os.environ.get("BENCH_MIGRATION", "1") != "0":
        print("\nlive migration (QEMU 10, same host; PASST_BIN names a vhost-user passt):", flush=True)
        print(migration.HEADER, flush=True)
        migration_results = migration.run(*guest.passt_binary())
    guest_results["migration"] = migration_results
    guest_results["testpmd"] = [r.as_dict() for r in pmd_results]
    guest_results["tcp_streams"] = [item.as_dict() if not isinstance(item, tuple) else
                                    {"case": str(item[0]), "error": item[1]} for item in stream_results]
    write_results(RESULTS_FILE, _meta(settings, load), refs, results, table_rows, guest_results)
    print(f"wrote {RESULTS_FILE} ({time.monotonic() - started:.0f} s in all)")
    return 1 if any(isinstance(item, tuple) for item in [*results, *stream_results]) else 0


if __name__ == "__main__":
    sys.exit(main())
