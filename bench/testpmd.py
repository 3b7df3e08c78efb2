"""64-byte frames from DPDK testpmd (txonly) into each back-end: frames per second and the back-end's CPU.

Theory of operation
-------------------
testpmd's virtio-user port (:class:`tests.guest.testpmd.Testpmd`, Debian's
DPDK) is a real poll-mode vhost-user front-end: in txonly mode it fills its
TX rings with 64-byte UDP frames as fast as the back-end empties them, so the
rate at which it manages to send is the rate at which the back-end takes
frames.  Each case runs one back-end in a namespace of its own
(:class:`~tests.guest.netns.TestNetns`; the frames go from the namespace's
host address to its gateway, which the back-ends map to the host's loopback,
so nothing leaves), lets testpmd send for ``seconds`` and reads testpmd's TX
counter before and after; the back-end's CPU is the user + system time of
its processes meanwhile (:func:`bench.cputime.tree_cpu`).

Cases: shardswitch with 1 worker and 1 queue pair, with 2 workers and 2
queue pairs, and passt (one thread, one queue pair) when ``PASST_BIN`` names
a vhost-user passt.  testpmd polls with two lcores: on a 2-CPU machine it
takes most of one CPU, and the back-ends share the rest, which the table says.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.guest.netns import TestNetns, stop_process
from tests.guest.testpmd import FwdMode, Testpmd, TestpmdError
from tests.switch import Switch

from bench import cputime

#: Time for the back-end to set up the rings testpmd announced before sending starts (seconds).
SETTLE = 1.0


@dataclass(slots=True)
class PmdResult:
    """One back-end's figures."""

    backend: str
    queues: int
    frames_per_s: float
    backend_cpu: float           # CPU share of the back-end's processes (1.0 = one CPU)
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def _passt(netns: TestNetns, tmp: Path, passt: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A vhost-user passt in the namespace, its socket there."""
    sock = tmp / "passt.sock"
    proc = netns.popen([passt, "--vhost-user", "-s", str(sock), "-f", "-1", "--runas", "0"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    return proc, sock


def run_case(backend: str, queues: int, seconds: float, passt: str | None) -> PmdResult:
    """testpmd txonly into ``backend`` with ``queues`` queue pairs for ``seconds``."""
    with tempfile.TemporaryDirectory(prefix="shardswitch-pmd-") as t, TestNetns() as netns:
        tmp = Path(t)
        switch: Switch | None = None
        proc: subprocess.Popen[bytes] | None = None
        try:
            if backend == "passt":
                assert passt is not None
                proc, sock = _passt(netns, tmp, passt)
                root = proc.pid
            else:
                switch = Switch(tmp, workers=queues, prefix=netns.exec_argv([]), addressing=[]).start()
                assert switch.proc is not None
                sock, root = Path(switch.socket), switch.proc.pid
            with Testpmd(sock, netns, queues=queues) as pmd:
                time.sleep(SETTLE)
                pmd.set_fwd(FwdMode.TXONLY)
                sent = pmd.port_stats()[0].tx_packets
                cpu = cputime.tree_cpu(root)
                start = time.monotonic()
                pmd.start()
                time.sleep(seconds)
                pmd.stop()
                span = time.monotonic() - start
                cpu = cputime.tree_cpu(root) - cpu
                sent = pmd.port_stats()[0].tx_packets - sent
                pmd.quit()
            return PmdResult(backend, queues, sent / span, cpu / span)
        except (TestpmdError, RuntimeError, OSError) as exc:
            return PmdResult(backend, queues, 0.0, 0.0, str(exc).splitlines()[0] if str(exc) else repr(exc))
        finally:
            if switch is not None:
                switch.stop()
            if proc is not None:
                stop_process(proc)


HEADER = "  back-end     queues   frames/s   back-end CPU"


def format_result(r: PmdResult) -> str:
    """One table row."""
    if r.error:
        return f"  {r.backend:12} {r.queues:6}   failed: {r.error}"
    return f"  {r.backend:12} {r.queues:6} {r.frames_per_s:10,.0f}   {r.backend_cpu:10.0%}"


def run(seconds: float, passt: str | None) -> list[PmdResult]:
    """Every case, printed as they come, then shardswitch's rates over passt's."""
    cases = [("shardswitch", 1), ("shardswitch", 2)] + ([("passt", 1)] if passt else [])
    results = []
    for backend, queues in cases:
        result = run_case(backend, queues, seconds, passt)
        results.append(result)
        print(format_result(result), flush=True)
    peer = next((r for r in results if r.backend == "passt" and not r.error), None)
    if peer is not None and peer.frames_per_s:
        print("  " + ", ".join(f"shardswitch {r.queues} queue(s) {r.frames_per_s / peer.frames_per_s:.2f}x passt"
                               for r in results if r.backend == "shardswitch" and not r.error), flush=True)
    if os.cpu_count() == 2:
        print("  (2 CPUs: testpmd's polling lcore takes most of one, the back-end gets the other)", flush=True)
    return results
