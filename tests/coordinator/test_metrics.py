"""Prometheus metrics (coordinator/metrics.py): the exposition of a status, and the --metrics endpoint of a
running switch in a test namespace, scraped while the front-end sends, against ``shardswitch status``.

The exposition is parsed back with prometheus-client's own parser, as a scraper would.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardswitch.coordinator.metrics import exposition
from shardswitch.frontend.client import VhostUserFrontend
from tests.guest.netns import TestNetns
from tests.switch import Switch
from tests.switchkit import arp_roundtrip, is_periodic_ra

#: A frame the switch drops (an unknown EtherType): traffic to count.
FILLER = bytes.fromhex("9a559a559a55" "525400123456" "88b5") + b"f" * 1000

FETCH = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(sys.argv[2].encode().decode("unicode_escape").encode("latin-1"))
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.write(data.decode())
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


STATUS: dict[str, Any] = {
    "version": "0.1.0", "mode": "server", "uptime": 12.5,
    "frontend": {"connected": True, "refused": {"MALFORMED": 2}},
    "workers": [
        {"pair": 0, "restarts": 1, "answered": True, "tx_frames": 10, "tx_bytes": 1000, "rx_frames": 7,
         "rx_bytes": 700, "drops": {"TCP_IGNORED": 3}, "events": {"DIRTY_LOG_RING": 2}, "flows": 4,
         "rings": [{"index": 0, "state": "running", "kicks": 5, "calls": 6},
                   {"index": 1, "state": "broken", "kicks": 1, "calls": 0}]},
        {"pair": 1, "restarts": 0, "answered": False},
    ],
    "flow_table": {"capacity": 1024, "entries": 4, "instance": "x"},
}
FLOWS = {"flows": [{"type": "tcp", "state": "active"}, {"type": "tcp", "state": "active"},
                   {"type": "udp", "state": "active"}, {"type": "ping4", "state": "new"}]}


def test_exposition_of_a_status() -> None:
    """Every figure of the status under its name and labels; an unanswered worker shows as down."""
    got = samples(exposition(STATUS, FLOWS).decode())
    assert got[("shardswitch_frames_total", (("direction", "tx"), ("pair", "0")))] == 10
    assert got[("shardswitch_bytes_total", (("direction", "rx"), ("pair", "0")))] == 700
    assert got[("shardswitch_drops_total", (("pair", "0"), ("reason", "TCP_IGNORED")))] == 3
    assert got[("shardswitch_events_total", (("event", "DIRTY_LOG_RING"), ("pair", "0")))] == 2
    assert got[("shardswitch_worker_restarts_total", (("pair", "0"),))] == 1
    assert got[("shardswitch_worker_up", (("pair", "1"),))] == 0
    assert got[("shardswitch_ring_state", (("pair", "0"), ("ring", "1"), ("state", "broken")))] == 1
    assert got[("shardswitch_ring_interrupts_total", (("pair", "0"), ("ring", "0")))] == 6
    assert got[("shardswitch_flows", (("state", "active"), ("type", "tcp")))] == 2
    assert got[("shardswitch_flow_table", (("counter", "entries"),))] == 4
    assert got[("shardswitch_frontend_refused_total", (("request", "MALFORMED"),))] == 2
    assert got[("shardswitch_frontend_connected", ())] == 1
    assert not any(name == "shardswitch_frames_total" and ("pair", "1") in labels for name, labels in got)


def fetch(netns: TestNetns, port: int, request: str) -> str:
    """Send ``request`` (escapes allowed) to the endpoint inside the namespace; the raw answer."""
    done = netns.run([sys.executable, "-c", FETCH, str(port), request], timeout=30)
    return done.stdout


@pytest.fixture
def metrics_switch(tmp_path: Path, netns: TestNetns) -> Any:
    """A 2-worker switch with --metrics on the namespace's loopback; (switch, port)."""
    port = 20000 + secrets.randbelow(20000)
    with Switch(tmp_path, workers=2, prefix=netns.exec_argv([]), args=["--metrics", f"127.0.0.1:{port}"]) as sw:
        yield sw, port


def test_scrape_matches_status(metrics_switch: tuple[Switch, int], netns: TestNetns) -> None:
    """Scraped while the front-end sends on both pairs: each counter lies between the status taken before
    and the one taken after (and grew meanwhile), ring states agree; the log names the endpoint."""
    switch, port = metrics_switch
    with VhostUserFrontend.connect(switch.socket, queue_pairs=2, ignore=is_periodic_ra) as fe:
        fe.handshake()
        for _ in range(5):
            for pair in range(2):
                arp_roundtrip(fe, pair)
        sending = threading.Event()
        done = threading.Event()

        def transfer() -> None:                       # frames on both pairs while the scrape runs
            while not done.is_set():
                for pair in range(2):
                    fe.send_frames(pair, [FILLER] * 16)
                sending.set()
                time.sleep(0.002)

        sender = threading.Thread(target=transfer)
        sender.start()
        try:
            sending.wait(5)
            before = switch.status()
            answer = fetch(netns, port, "GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            after = switch.status()
        finally:
            done.set()
            sender.join(10)
    head, _, body = answer.partition("\n\n")           # text mode: \r\n read as \n
    assert head.startswith("HTTP/1.1 200 OK") and "Content-Type: text/plain" in head, head
    got = samples(body)
    for b, a in zip(before["workers"], after["workers"]):
        pair = str(b["pair"])
        for direction in ("tx", "rx"):
            value = got[("shardswitch_frames_total", (("direction", direction), ("pair", pair)))]
            assert b[f"{direction}_frames"] <= value <= a[f"{direction}_frames"], (direction, b, value, a)
        assert b["tx_frames"] >= 5 and a["tx_frames"] > b["tx_frames"]
        for ring in a["rings"]:
            assert got[("shardswitch_ring_state", (("pair", pair), ("ring", str(ring["index"])),
                                                   ("state", ring["state"])))] == 1
    assert got[("shardswitch_frontend_connected", ())] == 1
    assert f"metrics on http://127.0.0.1:{port}/metrics" in switch.log()


def test_bad_requests_and_the_control_socket(metrics_switch: tuple[Switch, int], netns: TestNetns,
                                             tmp_path: Path) -> None:
    """Another path: 404; not HTTP: 400; too long: 400; the switch serves on.  `shardswitch metrics` prints
    the same exposition from the control socket."""
    switch, port = metrics_switch
    assert fetch(netns, port, "GET /other HTTP/1.0\\r\\n\\r\\n").startswith("HTTP/1.1 404")
    assert fetch(netns, port, "HELLO\\r\\n\\r\\n").startswith("HTTP/1.1 400")
    assert fetch(netns, port, "GET /" + "x" * 9000).startswith("HTTP/1.1 400")
    assert switch.status()["frontend"]["connected"] is False
    env_path = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-m", "shardswitch", "metrics", "--control", switch.control],
                          capture_output=True, text=True, timeout=30, env={"PYTHONPATH": env_path})
    assert done.returncode == 0, done.stderr
    assert ("shardswitch_worker_up", (("pair", "1"),)) in samples(done.stdout + "\n")


IDLE = r"""
import socket, sys, time
port = int(sys.argv[1])
idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
time.sleep(0.3)
extra = socket.create_connection(("127.0.0.1", port), timeout=10)
start = time.monotonic()
print("extra", extra.recv(10), round(time.monotonic() - start, 1))
start = time.monotonic()
print("idle", [s.recv(10) for s in idle], round(time.monotonic() - start))
"""


def test_idle_clients_are_bounded_and_closed_at_their_deadline(metrics_switch: tuple[Switch, int],
                                                               netns: TestNetns) -> None:
    """Eight clients that send nothing hold every slot: a ninth is closed at once, the eight at their
    2-second deadline; then a scrape works."""
    switch, port = metrics_switch
    out = netns.run([sys.executable, "-c", IDLE, str(port)], timeout=30).stdout
    assert "extra b'' 0.0" in out and "idle [b'', b'', b'', b'', b'', b'', b'', b''] 2" in out, out
    assert fetch(netns, port, "GET /metrics HTTP/1.1\\r\\n\\r\\n").startswith("HTTP/1.1 200 OK")
    assert switch.status()["frontend"]["connected"] is False
