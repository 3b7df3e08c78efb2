"""Frame-rate benchmark: TX ring -> worker -> RX ring through a real shardswitch.

Theory of operation
-------------------
One :class:`Case` is one measurement: a fresh shardswitch (``tests/switch.py``'s
:class:`~tests.switch.Switch`, under ``unshare --net`` so nothing can leave)
with ``workers`` workers, a :class:`~shardswitch.frontend.client.VhostUserFrontend`
connected to it with ``workers`` queue pairs of ``ring_size`` entries, and
one workload:

* ``reflect``: the switch runs with the hidden ``--reflect`` option, so a
  worker writes every frame it takes from its TX ring into its RX ring
  (``shardswitch/worker/datapath.py``); frames of ``frame_size`` bytes;
* ``arp``: the normal path; the frames are ARP requests (42 bytes, padded
  with zeros to ``frame_size``) from the guest for its gateway, and the
  worker's endpoint answers each with a 42-byte ARP reply on the RX ring.

Frame sizes are Ethernet frame lengths as they sit in the ring (no FCS),
each behind the 12-byte virtio-net header.

After the handshake the parent takes over both rings of every pair with a
:class:`~bench.driver.PairDriver` (all guest memory is allocated before
forking) and forks one driver process per pair: the driver side is Python
too, and one process per pair keeps it from being the shared bottleneck.
The memfd mapping and the eventfds are inherited; the vhost-user socket
stays with the parent, which must keep it open for the rings to live.
Every process works to the same monotonic-clock marks: start + warm-up
(``BENCH_WARMUP``), then + ``BENCH_SECONDS``.  Each driver samples its own
counters and CPU time at each mark; the parent samples, at the same marks,
each worker's CPU time (``/proc/<pid>/stat``, PIDs from ``switch.status()``)
and the workers' own frame counters (``status``).

Figures per case: frames per second per pair (what the drivers received)
and in total; each worker's CPU use; and frames per worker-CPU-second (the
workers' own RX counter over their CPU time), the figure that does not
depend on how fast the driver is.  A driver's CPU share near 100 % means the
driver, not the worker, limited the rate.  The machine's busy time
(``/proc/stat``) minus all of the above is what other programs used
meanwhile: figures taken while that is high are not comparable.  Before a result counts, the last
RX buffer of each pair is compared with the expected frame.

All failures are raised as :class:`BenchError`.
"""

from __future__ import annotations

import json
import os
import select
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shardswitch.coordinator.control import ControlError
from shardswitch.frontend.client import FrontendError, VhostUserFrontend
from shardswitch.net import arp, eth
from shardswitch.net.ipv4 import addr_from_str
from shardswitch.virtio.netdev import VNET_HDR, VNET_HDR_LEN
from tests.switch import DEFAULT_ADDRESSING, Switch
from tests.switchkit import is_periodic_ra

from bench.driver import DriverError, PairDriver, Sample

#: The guest's MAC in the benchmark frames.
GUEST_MAC = bytes.fromhex("525400123456")
#: Guest and gateway addresses: those of tests/switch.py's DEFAULT_ADDRESSING.
GUEST_IP = DEFAULT_ADDRESSING[DEFAULT_ADDRESSING.index("-a") + 1]
GATEWAY_IP = DEFAULT_ADDRESSING[DEFAULT_ADDRESSING.index("-g") + 1]
#: The switch's MAC (the GuestParams default).
SWITCH_MAC = eth.mac_from_str("9a:55:9a:55:9a:55")
#: EtherType of reflected frames (IEEE local experimental; reflect mode never parses them).
ETHERTYPE_EXPERIMENTAL = 0x88B5
#: RX buffer size the drivers post (header + a 1500-byte frame fit in one).
RX_BUF_LEN = 1536
#: Extra time the parent waits for the drivers' results after the last mark (seconds).
RESULT_GRACE = 15.0
#: Time from forking to the first mark, so that every driver starts before the warm-up counts.
START_DELAY = 0.05

MODES = ("reflect", "arp")


class BenchError(Exception):
    """A benchmark could not be run or produced an invalid result."""


@dataclass(frozen=True, slots=True)
class Workload:
    """What the driver sends and what it must get back."""

    #: virtio-net header + frame, placed in every TX buffer.
    tx_payload: bytes
    #: The frame every RX buffer must hold.
    rx_frame: bytes

    @property
    def rx_len(self) -> int:
        """Bytes the worker must report for each RX buffer (header + frame)."""
        return VNET_HDR_LEN + len(self.rx_frame)

    def rx_expected(self) -> bytes:
        """Header (num_buffers 1) + frame, as the worker writes it."""
        return VNET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + self.rx_frame


def _tx_header() -> bytes:
    """A zeroed virtio-net header."""
    return bytes(VNET_HDR_LEN)


def reflect_workload(size: int) -> Workload:
    """Frames of ``size`` bytes (header + counting pattern) that come back unchanged."""
    if size < eth.ETH_HLEN:
        raise BenchError(f"frame size {size} is shorter than an Ethernet header")
    frame = bytearray(size)
    eth.pack_header_into(frame, 0, eth.BROADCAST_MAC, GUEST_MAC, ETHERTYPE_EXPERIMENTAL)
    frame[eth.ETH_HLEN:] = bytes(i & 0xFF for i in range(size - eth.ETH_HLEN))
    return Workload(_tx_header() + bytes(frame), bytes(frame))


def arp_workload(size: int) -> Workload:
    """ARP requests for the gateway padded to ``size`` bytes, answered by 42-byte replies."""
    guest, gateway = addr_from_str(GUEST_IP), addr_from_str(GATEWAY_IP)
    request = arp.build_frame(eth.BROADCAST_MAC, GUEST_MAC,
                              arp.ArpPacket(arp.ArpOp.REQUEST, GUEST_MAC, guest, eth.ZERO_MAC, gateway))
    if size < len(request):
        raise BenchError(f"frame size {size} is shorter than an ARP request ({len(request)})")
    reply = arp.build_frame(GUEST_MAC, SWITCH_MAC,
                            arp.ArpPacket(arp.ArpOp.REPLY, SWITCH_MAC, gateway, GUEST_MAC, guest))
    return Workload(_tx_header() + request + bytes(size - len(request)), reply)


@dataclass(frozen=True, slots=True)
class Case:
    """One measurement."""

    mode: str
    frame_size: int
    workers: int
    ring_size: int

    def workload(self) -> Workload:
        """The frames of this case."""
        if self.mode == "reflect":
            return reflect_workload(self.frame_size)
        if self.mode == "arp":
            return arp_workload(self.frame_size)
        raise BenchError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")


@dataclass(slots=True)
class PairResult:
    """What one queue pair's driver measured."""

    pair: int
    rx_fps: float
    tx_fps: float
    #: Driver CPU use as a fraction of one CPU.
    driver_cpu: float
    kicks_per_s: float
    waits_per_s: float
    timeouts: int
    unsignalled: int
    verified: bool


@dataclass(slots=True)
class WorkerResult:
    """What one worker did during the measured interval (its own counters and CPU time)."""

    pair: int
    pid: int
    #: CPU use as a fraction of one CPU.
    cpu: float
    rx_frames: int
    tx_frames: int
    #: Frames the worker put into its RX ring per second of its own CPU time.
    frames_per_cpu_s: float
    drops: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class CaseResult:
    """One case's figures."""

    case: Case
    #: Length of the measured interval (seconds).
    seconds: float
    pairs: list[PairResult]
    workers: list[WorkerResult]
    #: CPU use of the coordinator during the interval (fraction of one CPU).
    coordinator_cpu: float
    #: CPU used on the machine by everything but this benchmark (fraction of one CPU).
    other_cpu: float

    @property
    def rx_fps(self) -> float:
        """Frames per second received on all RX rings together."""
        return sum(p.rx_fps for p in self.pairs)

    @property
    def worker_cpu(self) -> float:
        """CPU use of all workers together (fraction of one CPU)."""
        return sum(w.cpu for w in self.workers)

    @property
    def frames_per_worker_cpu_s(self) -> float:
        """RX frames of all workers per second of all workers' CPU time."""
        cpu = self.worker_cpu * self.seconds
        return sum(w.rx_frames for w in self.workers) / cpu if cpu > 0 else 0.0

    @property
    def driver_cpu(self) -> float:
        """The busiest driver's CPU use (fraction of one CPU)."""
        return max((p.driver_cpu for p in self.pairs), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON), with the derived totals."""
        out = asdict(self)
        out.update(rx_fps=self.rx_fps, worker_cpu=self.worker_cpu,
                   frames_per_worker_cpu_s=self.frames_per_worker_cpu_s,
                   rx_mbit_s=self.rx_fps * len(self.case.workload().rx_frame) * 8 / 1e6)
        return out


# -- process accounting --------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (from /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read the CPU time of process {pid}: {exc}") from exc
    # Fields after the command name (which may hold spaces), 1-based: 14 utime, 15 stime.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read /proc/stat: {exc}") from exc
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _CLK_TCK


@dataclass(slots=True)
class _Snapshot:
    """The parent's view of the switch and the machine at one mark."""

    time: float
    cpu: dict[int, float]            # pid -> CPU seconds
    busy: float                      # machine_busy_seconds()
    workers: list[dict[str, Any]]    # status entries, by pair


def _status(switch: Switch) -> dict[str, Any]:
    """The switch's status answer (BenchError when it does not answer)."""
    try:
        return switch.status()
    except ControlError as exc:
        raise BenchError(f"the switch's control socket did not answer: {exc}") from exc


def _snapshot(switch: Switch, pids: list[int]) -> _Snapshot:
    """CPU times of ``pids`` and of the machine, and the workers' status, now."""
    now = time.monotonic()
    cpu = {pid: cpu_seconds(pid) for pid in pids}
    busy = machine_busy_seconds()
    return _Snapshot(now, cpu, busy, list(_status(switch)["workers"]))


def sleep_until(mark: float) -> None:
    """Sleep until the monotonic time ``mark``."""
    delay = mark - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# -- driver processes ----------------------------------------------------------

def _child(driver: PairDriver, marks: list[float], expected: bytes, out_fd: int) -> None:
    """Body of a forked driver: run, verify, report as JSON on ``out_fd``, never return.

    Whatever happens, the child ends in ``os._exit``: it must never unwind
    into the parent's code (the switch, the front-end) that it inherited.
    """
    code = 1
    try:
        try:
            samples = driver.run(marks)
            report: dict[str, Any] = {"samples": [s.as_dict() for s in samples],
                                      "verified": driver.verify(expected)}
            code = 0
        except Exception as exc:         # reported to the parent, which raises BenchError
            report = {"error": f"pair {driver.pair}: {type(exc).__name__}: {exc}"}
        view = memoryview(json.dumps(report).encode())
        while view:
            view = view[os.write(out_fd, view):]
    finally:
        os._exit(code)


def collect_reports(fds: dict[int, int], deadline: float) -> dict[int, dict[str, Any]]:
    """Read every driver's JSON report (pair -> report) until EOF on each pipe or ``deadline``."""
    buffers = {fd: b"" for fd in fds.values()}
    pair_of = {fd: pair for pair, fd in fds.items()}
    open_fds = set(buffers)
    while open_fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"driver(s) of pair(s) {sorted(pair_of[fd] for fd in open_fds)} did not report")
        ready, _w, _x = select.select(list(open_fds), [], [], remaining)
        for fd in ready:
            chunk = os.read(fd, 65536)
            if chunk:
                buffers[fd] += chunk
            else:
                open_fds.discard(fd)
    reports: dict[int, dict[str, Any]] = {}
    for fd, data in buffers.items():
        try:
            reports[pair_of[fd]] = json.loads(data)
        except ValueError as exc:
            raise BenchError(f"driver of pair {pair_of[fd]} sent an unreadable report") from exc
    return reports


def _fork_drivers(drivers: list[PairDriver], marks: list[float],
                  expected: bytes) -> tuple[list[int], dict[int, int]]:
    """Fork one process per driver; return their PIDs and the read ends of their report pipes."""
    pids: list[int] = []
    fds: dict[int, int] = {}
    for driver in drivers:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(driver, marks, expected, write_fd)
        os.close(write_fd)
        pids.append(pid)
        fds[driver.pair] = read_fd
    return pids, fds


def _reap(pids: list[int]) -> None:
    """Wait for the driver processes (they exit on their own after the last mark)."""
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


# -- one case ------------------------------------------------------------------

def _pair_result(pair: int, report: dict[str, Any]) -> PairResult:
    """Rates from a driver's two samples."""
    if "error" in report:
        raise BenchError(str(report["error"]))
    first, last = (Sample(**s) for s in report["samples"])
    span = last.time - first.time
    if span <= 0:
        raise BenchError(f"pair {pair}: empty measurement interval")
    return PairResult(pair=pair, rx_fps=(last.rx_frames - first.rx_frames) / span,
                      tx_fps=(last.tx_frames - first.tx_frames) / span,
                      driver_cpu=(last.cpu - first.cpu) / span,
                      kicks_per_s=(last.kicks - first.kicks) / span,
                      waits_per_s=(last.waits - first.waits) / span,
                      timeouts=last.timeouts - first.timeouts,
                      unsignalled=last.unsignalled - first.unsignalled, verified=bool(report["verified"]))


def _drop_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Drop counters that grew between two status answers."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _worker_results(first: _Snapshot, last: _Snapshot) -> list[WorkerResult]:
    """Per-worker CPU use and frame counts between two snapshots."""
    span = last.time - first.time
    results = []
    for before, after in zip(first.workers, last.workers):
        pid = int(after["pid"])
        cpu = last.cpu[pid] - first.cpu[pid]
        rx = int(after["rx_frames"]) - int(before["rx_frames"])
        results.append(WorkerResult(pair=int(after["pair"]), pid=pid, cpu=cpu / span, rx_frames=rx,
                                    tx_frames=int(after["tx_frames"]) - int(before["tx_frames"]),
                                    frames_per_cpu_s=rx / cpu if cpu > 0 else 0.0,
                                    drops=_drop_delta(before.get("drops") or {}, after.get("drops") or {})))
    return results


def _worker_pids(switch: Switch, count: int) -> list[int]:
    """The PIDs of the switch's workers, checking that all are up and answering."""
    workers = _status(switch)["workers"]
    if len(workers) != count or not all(w.get("answered") and w.get("pid") for w in workers):
        raise BenchError(f"expected {count} answering workers, status says {workers}")
    return [int(w["pid"]) for w in workers]


def run_case(case: Case, seconds: float, warmup: float, tmp: Path) -> CaseResult:
    """Start a switch, drive it for ``warmup`` + ``seconds``, and return the figures."""
    args = ["--reflect"] if case.mode == "reflect" else []
    switch = Switch(tmp, workers=case.workers, args=args)
    try:
        switch.start()
    except RuntimeError as exc:
        raise BenchError(f"{case}: {exc}") from exc
    try:
        return _measure(case, switch, seconds, warmup)
    finally:
        switch.stop()


def _measure(case: Case, switch: Switch, seconds: float, warmup: float) -> CaseResult:
    """Connect to the running ``switch``, fork the drivers, take the two snapshots, compute."""
    workload = case.workload()
    try:
        fe = VhostUserFrontend.connect(switch.socket, queue_pairs=case.workers, ring_size=case.ring_size, ignore=is_periodic_ra)
    except FrontendError as exc:
        raise BenchError(f"cannot connect to the switch: {exc}") from exc
    with fe:
        try:
            fe.handshake()
            drivers = [PairDriver(fe, pair, workload.tx_payload, RX_BUF_LEN, workload.rx_len)
                       for pair in range(case.workers)]
        except (FrontendError, DriverError) as exc:
            raise BenchError(f"{case}: {exc}\n{switch.log()}") from exc
        pids = _worker_pids(switch, case.workers)
        coordinator_pid = int(_status(switch)["pid"])
        watched = [*pids, coordinator_pid]
        start = time.monotonic() + START_DELAY
        marks = [start + warmup, start + warmup + seconds]
        children, fds = _fork_drivers(drivers, marks, workload.rx_expected())
        try:
            sleep_until(marks[0])
            first = _snapshot(switch, watched)
            sleep_until(marks[1])
            last = _snapshot(switch, watched)
            reports = collect_reports(fds, marks[1] + RESULT_GRACE)
        finally:
            for fd in fds.values():
                os.close(fd)
            _reap(children)
        for driver in drivers:
            driver.release()
    if not switch.alive():
        raise BenchError(f"the switch died during {case}:\n{switch.log()}")
    pairs = [_pair_result(pair, reports[pair]) for pair in sorted(reports)]
    unverified = [p.pair for p in pairs if not p.verified]
    if unverified:
        raise BenchError(f"{case}: pair(s) {unverified} received frames other than expected")
    span = last.time - first.time
    workers = _worker_results(first, last)
    coordinator = (last.cpu[coordinator_pid] - first.cpu[coordinator_pid]) / span
    ours = coordinator + sum(w.cpu for w in workers) + sum(p.driver_cpu for p in pairs)
    other = max(0.0, (last.busy - first.busy) / span - ours)
    return CaseResult(case=case, seconds=span, pairs=pairs, workers=workers,
                      coordinator_cpu=coordinator, other_cpu=other)
