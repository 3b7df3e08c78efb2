"""Live-migration benchmark: the guest-visible gap when a guest moves, shardswitch beside passt.

A QEMU 10 guest pings its gateway every :data:`INTERVAL_MS` ms while QEMU
A migrates it to QEMU B (migrate to a unix socket, same host, inside a
network namespace this benchmark creates), back-end A to back-end B.  For each
migration:

* **gap**: the longest time between two echo replies the guest received, from
  the sequence numbers busybox ping prints (resolution :data:`INTERVAL_MS` ms):
  what the guest's network lost, end to end;
* **outage**: the same seen from outside, the service's view: a prober on the
  host sends a datagram every :data:`PROBE_MS` ms to the guest's UDP echo
  server through a forwarded port of each back-end (A forwards
  :data:`PORT_A`, B :data:`PORT_B`, both to the guest's :data:`ECHO_PORT`:
  two back-ends on one host cannot forward the same port) and reports the
  longest time without an echo; this includes the time the guest is stopped;
* **downtime** and **total**: what QEMU's query-migrate reports (the guest
  stopped, and the whole migration).

Back-ends: shardswitch with 1 and with 2 queue pairs (each switch with a
``shardswitch repair-helper``), and passt (``PASST_BIN`` naming a passt with
``--vhost-user``; one queue pair).  Each runs :data:`RUNS` times; the table
shows the median and the worst.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.guest.image import GuestImage, build_initramfs
from tests.guest.migratekit import migrate, two_guests
from tests.guest.netns import TestNetns, stop_process
from tests.guest.vm import GuestError, qemu10
from tests.switch import Switch

REPO = Path(__file__).resolve().parents[1]
#: Echo interval in the guest, and how many echoes one run sends.
INTERVAL_MS = 20
PINGS = 500
#: Migrations per back-end.
RUNS = 3
#: The outage prober's interval, the host ports A and B forward, and the guest's echo port.
PROBE_MS = 2
PORT_A, PORT_B, ECHO_PORT = 5601, 5602, 5600
#: The prober: sends seq-numbered datagrams to both forwarded ports until its stdin closes, then prints
#: "OUTAGE <longest ms without a reply> <replies>".
PROBER = """
import select, socket, sys, time
interval, ports = float(sys.argv[1]) / 1000, [int(p) for p in sys.argv[2:]]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
seq, last, gap, replies, due = 0, None, 0.0, 0, time.monotonic()
print("ready", flush=True)
while True:
    now = time.monotonic()
    if now >= due:
        for port in ports:
            try:
                s.sendto(seq.to_bytes(8, "big"), ("127.0.0.1", port))
            except OSError:
                pass
        seq, due = seq + 1, due + interval
    ready = select.select([s, sys.stdin], [], [], max(due - time.monotonic(), 0))[0]
    if sys.stdin in ready and not sys.stdin.readline():
        break
    while s in ready:
        try:
            s.recv(64)
        except BlockingIOError:
            break
        now = time.monotonic()
        if last is not None:
            gap = max(gap, now - last)
        last, replies = now, replies + 1
print(f"OUTAGE {gap * 1000:.1f} {replies}", flush=True)
"""
HEADER = (f"  back-end     queues  {'gap ms':>9}  {'outage ms':>11}  {'downtime ms':>11}  {'total ms':>11}  "
          f"{'lost':>5}\n  (each: median / worst of {RUNS} migrations; gap: the guest's longest time without a ping "
          f"reply,\n  {INTERVAL_MS} ms resolution; outage: a host prober's longest time without a UDP echo from the "
          f"guest, {PROBE_MS} ms resolution)")


@dataclass
class Run:
    """One migration's figures (None: not measured, with the reason in errors)."""

    gap_ms: float | None = None
    outage_ms: float | None = None
    lost: int | None = None
    downtime_ms: float | None = None
    total_ms: float | None = None
    errors: list[str] = field(default_factory=list)


def guest_script() -> str:
    """The guest's side: ping the gateway, then the longest run of missing replies."""
    return f"""
dhcp > /dev/null || exit 1
gw=$(ip route | awk '/default/ {{print $3}}')
udpecho {ECHO_PORT} &
echo PINGING
ping -c {PINGS} -i {INTERVAL_MS / 1000} -W 1 $gw > /tmp/ping 2>&1
awk -F'seq=' '/seq=/ {{split($2, a, " "); s = a[1] + 0; if (n && s - p > gap) gap = s - p; p = s; n++}}
     END {{print "===GAP", gap + 0, n + 0}}' /tmp/ping
echo PING-DONE
"""


def parse(output: str, info: dict[str, Any], probed: str) -> Run:
    """A run's figures from the guest's output (after the migration), query-migrate's answer and the
    prober's line."""
    run = Run(downtime_ms=info.get("downtime"), total_ms=info.get("total-time"))
    outage = re.search(r"OUTAGE ([\d.]+) (\d+)", probed)
    if outage and int(outage[2]):
        run.outage_ms = float(outage[1])
    else:
        run.errors.append(f"no echo from the guest: {probed.strip()!r}")
    found = re.search(r"===GAP (\d+) (\d+)", output)
    if found and int(found[2]):
        run.gap_ms = int(found[1]) * INTERVAL_MS
        run.lost = PINGS - int(found[2])
    else:
        run.errors.append("no ping result")
    return run


def _wait_socket(path: Path, timeout: float = 10.0) -> None:
    """Wait for a back-end's socket to appear."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise GuestError(f"{path} did not appear")
        time.sleep(0.05)


def _switches(stack: ExitStack, tmp: Path, netns: TestNetns, queues: int) -> tuple[Path, Path]:
    """Switches A and B, each with its repair helper."""
    sockets = []
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for side in "ab":
        (tmp / side).mkdir()
        port = PORT_A if side == "a" else PORT_B
        switch = stack.enter_context(Switch(tmp / side, workers=queues, prefix=netns.exec_argv([]),
                                            addressing=[], args=["-u", f"{port}:{ECHO_PORT}"]))
        helper = netns.popen([sys.executable, "-m", "shardswitch", "repair-helper", switch.socket + ".repair",
                              "--wait", "10"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(stop_process, helper)
        sockets.append(Path(switch.socket))
    return sockets[0], sockets[1]


def _passts(stack: ExitStack, tmp: Path, netns: TestNetns, passt: str) -> tuple[Path, Path]:
    """passt A and B in vhost-user mode."""
    sockets = []
    for side in "ab":
        sock = tmp / f"passt-{side}.sock"
        port = PORT_A if side == "a" else PORT_B
        proc = netns.popen([passt, "--vhost-user", "-s", str(sock), "-f", "--runas", "0",
                            "-u", f"{port}:{ECHO_PORT}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(stop_process, proc)
        _wait_socket(sock)
        sockets.append(sock)
    return sockets[0], sockets[1]


def run_one(image: GuestImage, netns: TestNetns, tmp: Path, backend: str, queues: int,
            passt: str | None) -> Run:
    """One migration of a pinging guest from back-end A to back-end B."""
    with ExitStack() as stack:
        try:
            sockets = (_passts(stack, tmp, netns, passt) if backend == "passt" and passt
                       else _switches(stack, tmp, netns, queues))
            guests = two_guests(stack, tmp, netns, image, guest_script(), sockets, queues)
            guests.vm_a.wait_for("PINGING", timeout=240)
            prober = netns.popen([sys.executable, "-u", "-c", PROBER, str(PROBE_MS), str(PORT_A), str(PORT_B)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            stack.callback(stop_process, prober)
            assert prober.stdout is not None and prober.stdout.readline().strip() == "ready"
            time.sleep(2)
            info = migrate(guests)
            guests.vm_b.wait_for("PING-DONE", timeout=120)
            probed, _ = prober.communicate("", timeout=10)
        except Exception as err:                  # a failed run is reported, the benchmark goes on
            return Run(errors=[str(err).splitlines()[0] if str(err) else type(err).__name__])
        return parse(guests.vm_b.output(), info, probed)


def run(passt: str | None, why_not: str) -> dict[str, Any]:
    """Every back-end, RUNS migrations each; the figures as data (rows printed as they come)."""
    if not Path(qemu10()[0]).exists():
        print("  skipped: QEMU 10 missing (scripts/install-qemu10.sh unpacks it)")
        return {"skipped": "QEMU 10 missing"}
    image = build_initramfs(REPO / ".cache" / "guest")
    backends = [("shardswitch", 1), ("shardswitch", 2)] + ([("passt", 1)] if passt else [])
    results: dict[str, Any] = {"interval_ms": INTERVAL_MS, "pings": PINGS, "runs": RUNS,
                               "passt": passt or why_not, "rows": []}
    with tempfile.TemporaryDirectory(prefix="shardswitch-migbench-") as tmp_name, TestNetns() as netns:
        for backend, queues in backends:
            runs = []
            for attempt in range(RUNS):
                run_dir = Path(tmp_name) / f"{backend}-{queues}-{attempt}"
                run_dir.mkdir()
                runs.append(run_one(image, netns, run_dir, backend, queues, passt))
            row = summarise(backend, queues, runs)
            results["rows"].append(row)
            print(format_row(row), flush=True)
    if not passt:
        print(f"  passt: not measured ({why_not})")
    return results


def summarise(backend: str, queues: int, runs: list[Run]) -> dict[str, Any]:
    """One back-end's runs, with medians and worsts."""
    def figures(attr: str) -> list[float]:
        return [v for v in (getattr(r, attr) for r in runs) if v is not None]

    row: dict[str, Any] = {"backend": backend, "queues": queues, "runs": [r.__dict__ for r in runs]}
    for attr in ("gap_ms", "outage_ms", "downtime_ms", "total_ms", "lost"):
        values = figures(attr)
        row[attr] = {"median": statistics.median(values), "worst": max(values)} if values else None
    row["errors"] = [e for r in runs for e in r.errors]
    return row


def format_row(row: dict[str, Any]) -> str:
    """One table line."""
    def pair(key: str) -> str:
        value = row[key]
        return f"{value['median']:.0f} / {value['worst']:.0f}" if value else "failed"

    line = (f"  {row['backend']:<12} {row['queues']:>6}  {pair('gap_ms'):>9}  {pair('outage_ms'):>11}  "
            f"{pair('downtime_ms'):>11}  {pair('total_ms'):>11}  {pair('lost'):>5}")
    return line + (f"   ({'; '.join(row['errors'])})" if row["errors"] else "")


if __name__ == "__main__":
    from bench.guest import passt_binary

    print(HEADER)
    run(*passt_binary())
