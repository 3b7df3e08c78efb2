"""Real-guest benchmark: shardswitch beside QEMU's user networking and passt, measured in one run.

Every back-end serves the same test guest (TCG unless SHARDSWITCH_ACCEL says
otherwise) inside a network namespace this benchmark creates.  The guest
talks only to its gateway, which each back-end maps to the namespace's
loopback, where the servers run: two iperf3 servers and busybox httpd.

Lines, per back-end:

* ping round-trip time to the gateway;
* iperf3 TCP guest->host and host->guest (``-R``), 1 stream with queues=1 and
  2 streams pinned to 2 vCPUs with queues=2 and -smp 2, at MTU 65520 and 1500;
* TCP connections per second the guest opens to the host (wget of a tiny file);
* the back-end's CPU per GB moved, for each iperf3 direction: user + system
  time of all its processes (:func:`bench.cputime.tree_cpu`), read when the
  guest prints the phase's start and end markers, over the bytes iperf3's
  receivers counted.  QEMU's user networking runs inside QEMU with the guest's
  TCG, so it has no such figure.

With ``BENCH_PROFILE=1`` a py-spy profile of shardswitch's processes is taken
during each direction of the 1-stream MTU 65520 shape, and its top functions
are printed and stored; that run is without the sandbox (py-spy cannot read
sandboxed processes), which its row says.

QEMU's user networking and passt have one queue pair: their "2 streams" lines
run with queues=1 (and -smp 2).  passt is measured when ``PASST_BIN`` names a
passt binary with ``--vhost-user``; otherwise its column says why it is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import cputime
from tests.guest.image import GuestImage, build_initramfs
from tests.guest.netns import TestNetns
from tests.guest.vm import GuestError, GuestVM
from tests.switch import Switch

REPO = Path(__file__).resolve().parents[1]
IPERF_PORTS = (5201, 5202)
HTTP_PORT = 8080
CRR_COUNT = 200


@dataclass(frozen=True)
class Shape:
    """One guest configuration."""

    streams: int
    mtu: int

    @property
    def label(self) -> str:
        """How the table names it."""
        return f"{self.streams} stream{'s' if self.streams > 1 else ''}, MTU {self.mtu}"


SHAPES = (Shape(1, 65520), Shape(1, 1500), Shape(2, 65520), Shape(2, 1500))


@dataclass
class Figures:
    """What one guest boot measured (None = failed, with the reason)."""

    rtt_ms: float | None = None
    up_mbps: float | None = None
    down_mbps: float | None = None
    crr: float | None = None
    #: Back-end CPU seconds per GB (10**9 bytes) moved, each direction (None: not measured).
    up_cpu_gb: float | None = None
    down_cpu_gb: float | None = None
    #: Top functions of the py-spy profile of each direction (BENCH_PROFILE=1).
    profile: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def guest_script(shape: Shape, seconds: int) -> str:
    """The guest's side of one run."""
    clients = []
    for direction, flag in (("UP", ""), ("DOWN", "-R")):
        lines = [f"taskset {1 << i} iperf3 -c $gw -p {port} -t {seconds} -f m {flag} > /tmp/{direction}{i} 2>&1 &"
                 for i, port in enumerate(IPERF_PORTS[:shape.streams])]
        lines.insert(0, f"echo ===BEGIN-{direction}")
        lines.append("wait")
        lines.append(f"echo ===END-{direction}")
        lines.append(f"for f in /tmp/{direction}*; do echo ==={direction}; cat $f; done")
        clients.append("\n".join(lines))
    return f"""
dhcp > /dev/null || exit 1
ip link set eth0 mtu {shape.mtu}
gw=$(ip route | awk '/default/ {{print $3}}')
echo ===PING; ping -c 20 -i 0.1 $gw | tail -1
{clients[0]}
{clients[1]}
i=0
start=$(cut -d' ' -f1 /proc/uptime)
while [ $i -lt {CRR_COUNT} ]; do wget -q -O /dev/null http://$gw:{HTTP_PORT}/x || break; i=$((i + 1)); done
end=$(cut -d' ' -f1 /proc/uptime)
echo ===CRR $i $start $end
"""


#: iperf3's receiver line with -f m: bytes transferred (in a unit it picks: KBytes are KiB...) and rate.
_RECEIVER = r"([\d.]+) ([KMGT]?)Bytes\s+([\d.]+) Mbits/sec\s+receiver"
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def moved_bytes(output: str, direction: str) -> int:
    """Bytes the receivers of ``direction``'s iperf3 runs counted (0 when none reported)."""
    total = 0.0
    for section in output.split(f"==={direction}\n")[1:]:
        found = re.search(_RECEIVER, section)
        if found:
            total += float(found[1]) * _UNITS[found[2]]
    return int(total)


def parse(output: str) -> Figures:
    """Figures from the guest's serial output."""
    figures = Figures()
    ping = re.search(r"===PING\s+round-trip min/avg/max = [\d.]+/([\d.]+)/", output)
    figures.rtt_ms = float(ping[1]) if ping else None
    for direction, attr in (("UP", "up_mbps"), ("DOWN", "down_mbps")):
        rates = [float(m[2]) for m in re.findall(rf"==={direction}\n(?:.*\n)*?.*?{_RECEIVER}", output)]
        setattr(figures, attr, sum(rates) if rates else None)
        if not rates:
            figures.errors.append(f"iperf3 {direction.lower()}: no result")
    crr = re.search(r"===CRR (\d+) ([\d.]+) ([\d.]+)", output)
    if crr and int(crr[1]) == CRR_COUNT and float(crr[3]) > float(crr[2]):
        figures.crr = CRR_COUNT / (float(crr[3]) - float(crr[2]))
    else:
        figures.errors.append("connections: " + (f"{crr[1]} of {CRR_COUNT} succeeded" if crr else "no result"))
    return figures


class Servers:
    """iperf3 and httpd servers on the namespace's loopback."""

    def __init__(self, netns: TestNetns, root: Path) -> None:
        """Start them inside ``netns``."""
        (root / "www").mkdir()
        (root / "www" / "x").write_bytes(b"x" * 100)
        self.procs = [netns.popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in IPERF_PORTS]
        busybox = shutil.which("busybox") or "/bin/busybox"
        self.procs.append(netns.popen([busybox, "httpd", "-f", "-p", f"127.0.0.1:{HTTP_PORT}",
                                       "-h", str(root / "www")], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        time.sleep(0.5)


def passt_binary() -> tuple[str | None, str]:
    """The passt to compare with, or None and why not."""
    path = os.environ.get("PASST_BIN")
    if not path:
        return None, "PASST_BIN not set"
    try:
        usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10)
    except OSError as err:
        return None, f"PASST_BIN={path}: {err.strerror}"
    if "--vhost-user" not in usage.stdout + usage.stderr:
        return None, f"PASST_BIN={path} has no --vhost-user"
    return path, ""


def run_guest(image: GuestImage, netns: TestNetns, tmp: Path, backend: str, shape: Shape, seconds: int,
              passt: str | None) -> Figures:
    """Boot the guest on ``backend`` with ``shape`` and measure."""
    script = guest_script(shape, seconds)
    smp = shape.streams
    timeout = 120 + 4 * seconds
    profile = cputime.profiling() and backend == "shardswitch" and shape == SHAPES[0]
    switch: Switch | None = None
    passt_proc: subprocess.Popen[bytes] | None = None
    try:
        if backend == "shardswitch":
            # py-spy cannot read the sandboxed processes (their mount view hides the interpreter's file).
            switch = Switch(tmp, workers=shape.streams, prefix=netns.exec_argv([]),
                            addressing=["-m", str(shape.mtu)], socket_path=str(tmp / "ss.sock"),
                            args=["--no-sandbox"] if profile else None).start()
            vm = GuestVM(image, script, socket=Path(switch.socket), queues=shape.streams, smp=smp, netns=netns)
        elif backend == "passt":
            assert passt is not None
            sock = tmp / "passt.sock"
            passt_proc = netns.popen([passt, "--vhost-user", "-s", str(sock), "-f", "-1", "--runas", "0",
                                      "-m", str(shape.mtu)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            for _ in range(50):
                if sock.exists():
                    break
                time.sleep(0.1)
            vm = GuestVM(image, script, socket=sock, queues=1, smp=smp, netns=netns)
        else:
            vm = GuestVM(image, script, smp=smp, netns=netns,
                         extra_args=["-netdev", "user,id=u0", "-device", "virtio-net-pci,netdev=u0,romfile="])
        root = switch.proc.pid if switch is not None and switch.proc is not None else \
            passt_proc.pid if passt_proc is not None else None
        with vm:
            try:
                cpu = {direction: measure_phase(vm, direction, root, timeout, tmp if profile else None, seconds)
                       for direction in ("UP", "DOWN")}
                vm.wait_exit(timeout=timeout)
            except GuestError as err:
                figures = parse(vm.output())
                figures.errors.append(str(err).splitlines()[0])
                return figures
            figures = parse(vm.output())
            for direction, (seconds_used, lines) in cpu.items():
                moved = moved_bytes(vm.output(), direction)
                if seconds_used is not None and moved:
                    setattr(figures, f"{direction.lower()}_cpu_gb", seconds_used / (moved / 1e9))
                if lines:
                    figures.profile[direction] = lines
            return figures
    finally:
        if switch is not None:
            switch.stop()
        if passt_proc is not None and passt_proc.poll() is None:
            passt_proc.kill()
            passt_proc.wait(5)


def measure_phase(vm: GuestVM, direction: str, root: int | None, timeout: float, profile_dir: Path | None,
                  seconds: int) -> tuple[float | None, list[str]]:
    """The back-end's CPU seconds while the guest ran ``direction``'s iperf3 clients (None: no back-end
    process to read), and the profile's top lines when ``profile_dir`` is given."""
    vm.wait_for(f"^===BEGIN-{direction}$", timeout)
    start = cputime.tree_cpu(root) if root is not None else None
    profiler = cputime.Profiler(root, profile_dir / f"profile-{direction}.txt", seconds) \
        if profile_dir is not None and root is not None else None
    vm.wait_for(f"^===END-{direction}$", timeout)
    used = cputime.tree_cpu(root) - start if root is not None and start is not None else None
    return used, profiler.summary() if profiler is not None else []


def run(seconds: int = 4) -> dict[str, Any]:
    """Every back-end and shape; the figures as data."""
    image = build_initramfs(REPO / ".cache" / "guest")
    passt, why_not = passt_binary()
    backends = ["shardswitch", "qemu-user"] + (["passt"] if passt else [])
    results: dict[str, Any] = {"seconds": seconds, "accel": os.environ.get("SHARDSWITCH_ACCEL", "tcg"),
                               "passt": passt or why_not, "rows": []}
    with tempfile.TemporaryDirectory(prefix="shardswitch-guestbench-") as tmp_name, TestNetns() as netns:
        tmp = Path(tmp_name)
        Servers(netns, tmp)
        for shape in SHAPES:
            for backend in backends:
                run_dir = tmp / f"{backend}-{shape.streams}-{shape.mtu}"
                run_dir.mkdir()
                figures = run_guest(image, netns, run_dir, backend, shape, seconds, passt)
                results["rows"].append({"backend": backend, "streams": shape.streams, "mtu": shape.mtu,
                                        **figures.__dict__})
                print(format_row(backend, shape, figures) + ("  (profiled, no sandbox)" if figures.profile else ""),
                      flush=True)
                for direction, lines in figures.profile.items():
                    print(f"    py-spy, {direction.lower()}:\n      " + "\n      ".join(lines), flush=True)
    return results


def _num(value: float | None, fmt: str) -> str:
    """A figure or 'failed'."""
    return format(value, fmt) if value is not None else "failed"


def format_row(backend: str, shape: Shape, f: Figures) -> str:
    """One table line."""
    line = (f"  {shape.label:<22} {backend:<12} {_num(f.up_mbps, '>9.0f')} {_num(f.down_mbps, '>9.0f')} "
            f"{_cpu(f.up_cpu_gb)} {_cpu(f.down_cpu_gb)} {_num(f.crr, '>8.1f')} {_num(f.rtt_ms, '>8.2f')}")
    return line + (f"   ({'; '.join(f.errors)})" if f.errors else "")


def _cpu(value: float | None) -> str:
    """A CPU-per-GB figure, or a dash where none is measured."""
    return format(value, ">9.2f") if value is not None else f"{'-':>9}"


HEADER = ("  shape                  back-end     g->h Mbit/s h->g Mbit/s g->h CPU/GB h->g CPU/GB conn/s  ping ms")


def ratios(results: dict[str, Any]) -> list[str]:
    """shardswitch's figures over each other back-end's, line by line."""
    lines = []
    rows = results["rows"]
    for other in ("qemu-user", "passt"):
        for row in rows:
            if row["backend"] != "shardswitch":
                continue
            peer = next((r for r in rows if r["backend"] == other and r["streams"] == row["streams"]
                         and r["mtu"] == row["mtu"]), None)
            if peer is None:
                continue
            parts = []
            for key, name in (("up_mbps", "g->h"), ("down_mbps", "h->g"), ("crr", "conn/s"),
                              ("up_cpu_gb", "g->h CPU/GB"), ("down_cpu_gb", "h->g CPU/GB")):
                if row.get(key) and peer.get(key):
                    parts.append(f"{name} {row[key] / peer[key]:.2f}x")
            lines.append(f"  vs {other:<10} {row['streams']} stream(s), MTU {row['mtu']}: "
                         + (", ".join(parts) or "no comparable figures"))
    return lines


if __name__ == "__main__":
    import json
    import sys

    print(HEADER)
    out = run(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
    print("\n".join(ratios(out)))
    print(json.dumps(out)[:200])
