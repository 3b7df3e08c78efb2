"""A guest flooding new UDP flows cannot flood the log, keep resources, or starve other flows.

A two-worker switch with a small flow table (``--max-flows 512``) runs in a
test namespace with a UDP echo server on its loopback.  For 10 s the guest
(the Python front-end) sends datagrams from ever new source ports to the
gateway, which the switch maps to that loopback: every datagram is a new
flow until the table is full, and then a TABLE_FULL drop.  Meanwhile:

* the log stays bounded: the table-full warning is rate-limited, so the
  thousands of drops give a handful of lines and a "suppressed" count
  (debug lines, which the test switch also writes, are not counted: the
  default level does not show them);
* a flow that existed before the flood keeps being answered;

and once the flood's flows expired (UDP's 30 s idle timeout), each worker
holds as many descriptors as before the flood, and about as much private
memory (RssAnon: the Python heap, not the guest memory it maps), the table
holds the old flow only, and it is still answered.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.guest.netns import TestNetns
from tests.switch import Switch
from tests.switchkit import ready_frontend
from tests.worker.udpkit import ECHO_PORT, conntrack_udp_timeouts, decode, frame4, start_echo_server

FLOOD_SECONDS = 10.0
MAX_FLOWS = 512
#: Log lines the flood may cause at most (rate-limited warnings, suppressed counts, start-up chatter).
MAX_LOG_LINES = 40
#: Private memory a worker may keep after the flood's flows expired (allocator slack), in KiB.
RSS_SLACK_KIB = 4096


def worker_fds(status: dict[str, object]) -> list[int]:
    """Open descriptors of each worker process."""
    return [len(os.listdir(f"/proc/{w['pid']}/fd")) for w in status["workers"]]  # type: ignore[attr-defined]


def worker_rss(status: dict[str, object]) -> list[int]:
    """Private anonymous memory (RssAnon, KiB) of each worker process."""
    sizes = []
    for worker in status["workers"]:  # type: ignore[attr-defined]
        with open(f"/proc/{worker['pid']}/status") as f:
            sizes += [int(line.split()[1]) for line in f if line.startswith("RssAnon:")]
    return sizes


def echoed(fe: object, sport: int) -> bool:
    """Send one datagram of the long-lived flow on pair 1 and wait for its echo."""
    fe.send_frame(1, frame4(sport, ECHO_PORT, b"still-here"))  # type: ignore[attr-defined]
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for frame in fe.recv_frames(1, timeout=0.5):  # type: ignore[attr-defined]
            if decode(frame)[4] == b"echo:still-here":
                return True
    return False


def test_udp_flow_flood(tmp_path: Path, netns: TestNetns) -> None:
    """10 s of new UDP flows: bounded log, the old flow still answered, descriptors back to the baseline."""
    echo_ns = start_echo_server(netns, tmp_path)
    with Switch(tmp_path, workers=2, prefix=echo_ns.exec_argv([]), args=["--max-flows", str(MAX_FLOWS)]) as sw, \
            ready_frontend(sw, rx=256) as fe:
        assert echoed(fe, 30001)
        time.sleep(1.5)   # the workers' pools of pre-opened TCP sockets are filled on their first tick
        (old_flow,) = sw.query("flows")["flows"]
        fds_before = worker_fds(sw.status())
        rss_before = worker_rss(sw.status())
        lines_before = len(sw.log().splitlines())
        sport, sent, checks = 1024, 0, 0
        end = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < end:
            batch = [frame4(sport + i, ECHO_PORT + 1, b"flood") for i in range(64)]
            sent += fe.send_frames(0, batch)
            sport = 1024 + (sport + 64 - 1024) % 60000
            fe.recv_frames(0, timeout=0.0)
            fe.post_rx(0, 64)
            if sent // 2000 > checks:
                checks += 1
                assert echoed(fe, 30001), f"the old flow went unanswered after {sent} flood datagrams"
        status = sw.status()
        full = sum(w["drops"].get("UDP_TABLE_FULL", 0) for w in status["workers"])
        assert sent > 2 * MAX_FLOWS and full > 0, (sent, status)
        # The test switch logs at debug level; what counts is what the default (info) level would show.
        log = [line for line in sw.log().splitlines()[lines_before:] if " DEBUG: " not in line]
        assert len(log) <= MAX_LOG_LINES, "\n".join(log[-50:])
        print(f"flood: {sent} datagrams, {full} table-full drops, {len(log)} log lines")
        deadline = time.monotonic() + conntrack_udp_timeouts(echo_ns).timeout + 15
        while time.monotonic() < deadline:
            if worker_fds(sw.status()) == fds_before and len(sw.query("flows")["flows"]) == 1:
                break
            time.sleep(1.0)
        assert sw.query("flows")["flows"] == [old_flow] or len(sw.query("flows")["flows"]) == 1
        assert worker_fds(sw.status()) == fds_before
        rss_after = worker_rss(sw.status())
        print(f"workers' private memory (KiB): before {rss_before}, after the flows expired {rss_after}")
        assert all(after <= before + RSS_SLACK_KIB for before, after in zip(rss_before, rss_after)), \
            (rss_before, rss_after)
        assert echoed(fe, 30001)
