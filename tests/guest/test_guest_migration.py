"""Live migration of a real QEMU 10 guest from one shardswitch to another (issue 11).

QEMU A with switch A migrates its running guest to QEMU B (started with
``-incoming``) with switch B, over a unix socket, on the same host.  During
the migration QEMU has both switches log the guest pages they write (LOG_SHMFD,
LOG_ALL, each ring's used-ring address); QEMU B then restarts the rings where
A stopped them.  The device state (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE)
carries the flows: with a ``shardswitch repair-helper`` beside each switch the
guest's TCP connections move (TCP_REPAIR); without one they are reset, and
the guest sees the RST at once.  Two hosts are a twin of the host namespace
(tests/guest/netns.py: same addresses and MAC) for switch B, the server
upstream, and the upstream switched over to the twin once the migration ended.

The guest's serial console follows it: what it prints after the migration
comes out of QEMU B.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pytest

from tests.conftest import in_ci
from tests.guest.image import GuestImage
from tests.guest.netns import TestNetns, stop_process
from tests.guest import migratekit
from tests.guest.migratekit import Migrating, two_guests
from tests.guest.vm import GuestVM, qemu10
from tests.switch import Switch

pytestmark = pytest.mark.guest

PINGS = 120
#: Echoes the guest may lose across the migration.
MAX_LOST = 10
STREAM_PORT = 8100
STREAM_MB = 50
#: The stream's pace: slow enough to be under way when the migration ends.
STREAM_RATE = 4 << 20

#: A paced stream server (on 127.0.0.1, or the upstream's server address): a client sends "big" (the file at the pace) or "small" (a short answer),
#: then half-closes.  It prints "ready", and "sent N" or "error <reason>" for each connection.
STREAM_SERVER = """
import socket, sys, threading, time
port, path, rate, addr = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
data = open(path, "rb").read()
def serve(conn):
    try:
        what = b""
        while not what.endswith(b"\\n"):
            got = conn.recv(16)
            if not got:
                break
            what += got
        if what.strip() != b"big":
            conn.sendall(b"small-answer\\n")
            print("sent small", flush=True)
            return
        start, sent, chunk = time.monotonic(), 0, 1 << 16
        while sent < len(data):
            sent += conn.send(data[sent:sent + chunk])
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        print(f"sent {sent}", flush=True)
    except OSError as err:
        print(f"error {err}", flush=True)
    finally:
        conn.close()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen(8)
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

def stream_script(server: str = "$gw") -> str:
    """The guest: a lease, the stream from ``server`` (its length, sha256, and the connections its TCP saw
    reset: EstabResets of /proc/net/snmp, since busybox nc ends with status 0 on a reset), then a new
    connection.  nc's input stays open (a half-closed connection would leave ESTABLISHED, where EstabResets
    no longer counts)."""
    return f"""
dhcp || exit 1
gw=$(ip route | awk '/default/ {{print $3}}')
echo STREAMING
{{ echo big; sleep 600; }} | nc {server} {STREAM_PORT} > /tmp/s 2> /tmp/nc.err &
nc=$!
while kill -0 $nc 2> /dev/null; do sleep 0.1; done
echo RESETS=$(awk '/^Tcp:/ {{n++; if (n == 2) print $9}}' /proc/net/snmp)
echo STREAM-END $(cat /proc/uptime)
echo DOWN=$(sha256sum < /tmp/s | cut -d' ' -f1) BYTES=$(wc -c < /tmp/s)
echo AFTER=$(echo small | nc {server} {STREAM_PORT})
echo GUEST-DONE
sleep 60
"""


def need_qemu10() -> None:
    """Skip (fail with CI=true) when QEMU 10 is not unpacked."""
    if not Path(qemu10()[0]).exists():
        missing = "QEMU 10 missing: scripts/install-qemu10.sh unpacks it (make test runs it)"
        if in_ci():
            pytest.fail(missing + " (CI=true: real-guest tests must not skip)", pytrace=False)
        pytest.skip(missing)


class Pair(NamedTuple):
    """Switch A with its guest, and switch B with QEMU B waiting for it."""

    switch_a: Switch
    switch_b: Switch
    vm_a: GuestVM
    vm_b: GuestVM
    guests: Migrating


@contextmanager
def two_switches(tmp_path: Path, netns: TestNetns, image: GuestImage, script: str, *,
                 helpers: bool, twin: bool = False) -> Iterator[Pair]:
    """Switches A and B (2 workers each) in the test's namespace (B in its twin with ``twin``: another host),
    QEMU A (queues=2) running ``script`` on A, QEMU B waiting for the migration on B; with ``helpers``, a
    ``shardswitch repair-helper`` (root) beside each switch."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ExitStack() as stack:
        switches = [stack.enter_context(Switch(tmp_path / side, workers=2,
                                               prefix=netns.exec_argv([], twin=twin and side == "b"),
                                               addressing=[])) for side in "ab"]
        if helpers:
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
            for switch in switches:
                proc = netns.popen([sys.executable, "-m", "shardswitch", "repair-helper",
                                    switch.socket + ".repair", "--wait", "10"], env=env)
                stack.callback(stop_process, proc)
            wait_helpers(switches)
        guests = two_guests(stack, tmp_path, netns, image, script,
                            (Path(switches[0].socket), Path(switches[1].socket)), queues=2)
        yield Pair(switches[0], switches[1], guests.vm_a, guests.vm_b, guests)


def wait_helpers(switches: list[Switch], timeout: float = 15.0) -> None:
    """Wait until each switch has its repair helper connected."""
    deadline = time.monotonic() + timeout
    for switch in switches:
        while not switch.status()["migration"]["repair_helper"]:
            assert time.monotonic() < deadline, f"no repair helper connected:\n{switch.log()}"
            time.sleep(0.1)


def migrate(pair: Pair) -> dict[str, Any]:
    """Migrate QEMU A's guest to QEMU B; query-migrate's last answer."""
    info = migratekit.migrate(pair.guests)
    print(f"migration: {info.get('total-time')} ms in all, downtime {info.get('downtime')} ms")
    return info


def start_stream_server(netns: TestNetns, tmp_path: Path,
                        upstream: bool = False) -> tuple[bytes, subprocess.Popen[str]]:
    """The paced stream server, serving STREAM_MB of random data (on the host's loopback, or with ``upstream``
    on the upstream's server address); the data and the server."""
    blob = os.urandom(STREAM_MB << 20)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    server = netns.popen([sys.executable, "-u", "-c", STREAM_SERVER, str(STREAM_PORT), str(path),
                          str(STREAM_RATE), netns.server_addr if upstream else "127.0.0.1"],
                         stdout=subprocess.PIPE, text=True, upstream=upstream)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return blob, server


def server_lines(server: subprocess.Popen[str], count: int, timeout: float = 30.0) -> list[str]:
    """The server's next ``count`` report lines."""
    assert server.stdout is not None
    os.set_blocking(server.stdout.fileno(), True)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < count and time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
    return lines


def tcp_flows_to(switch: Switch, port: int) -> list[dict[str, Any]]:
    """The switch's TCP flows whose host side is ``port``."""
    return [f for f in switch.query("flows")["flows"] if f["type"] == "tcp" and str(port) in str(f)]


def restored_on(switch: Switch) -> None:
    """Wait until ``switch`` holds the moved stream's connection: QEMU A reports the migration complete
    when it sent everything, while B's switch may still be restoring what it got (its CHECK_DEVICE_STATE
    answers once the workers are done)."""
    deadline = time.monotonic() + 20
    while not tcp_flows_to(switch, STREAM_PORT):
        if time.monotonic() >= deadline:
            print(switch.log())
            raise AssertionError(f"the stream's connection is not on B: {switch.query('flows')}")
        time.sleep(0.1)


def test_ping_survives_migration_between_two_switches(tmp_path: Path, netns: TestNetns,
                                                      guest_image: GuestImage) -> None:
    """queues=2, QEMU 10: a guest pinging its gateway every 0.2 s is migrated from switch A to switch B and
    loses at most MAX_LOST of PINGS echoes; B serves it afterwards."""
    need_qemu10()
    script = f"""
dhcp || exit 1
gw=$(ip route | awk '/default/ {{print $3}}')
echo PINGING
ping -c {PINGS} -i 0.2 -W 2 $gw > /tmp/ping 2>&1
tail -3 /tmp/ping
echo PING-DONE
sleep 60
"""
    with two_switches(tmp_path, netns, guest_image, script, helpers=False) as pair:
        pair.vm_a.wait_for("PINGING", timeout=240)
        migrate(pair)
        pair.vm_b.wait_for("PING-DONE", timeout=240)
        output = pair.vm_b.output()
        match = re.search(r"(\d+) packets transmitted, (\d+) packets received", output)
        assert match, output
        sent, received = int(match[1]), int(match[2])
        print(f"{sent - received} of {sent} echoes lost")
        assert sent == PINGS and sent - received <= MAX_LOST, (output, pair.switch_a.log()[-5000:],
                                                               pair.switch_b.log()[-5000:])
        status_b = pair.switch_b.status()
        assert status_b["frontend"]["connected"], status_b
        assert sum(w["tx_frames"] for w in status_b["workers"]) > 0, status_b
        assert all(r["state"] == "running" for w in status_b["workers"] for r in w["rings"]), status_b
        status_a = pair.switch_a.status()
        assert not any(w["restarts"] for w in status_b["workers"] + status_a["workers"])
        # A's workers logged the pages they wrote while QEMU copied memory; the device state went across.
        assert "dirty-page log of" in pair.switch_a.log()
        assert all(w["events"].get("DIRTY_LOG_RING", 0) >= 2 for w in status_a["workers"]), status_a
        assert status_a["migration"]["last"]["direction"] == "save", status_a["migration"]
        assert status_b["migration"]["last"]["direction"] == "loaded", status_b["migration"]


def test_tcp_stream_moves_with_the_guest(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """Acceptance 1: a 50 MB paced stream from a host server to the guest is under way while the guest moves
    from switch A to switch B (each with its repair helper); the stream completes with the right sha256, the
    connection is never reset on either side, and B lists the flow."""
    need_qemu10()
    blob, server = start_stream_server(netns, tmp_path)
    with two_switches(tmp_path, netns, guest_image, stream_script(), helpers=True) as pair:
        pair.vm_a.wait_for("STREAMING", timeout=240)
        time.sleep(3)                                   # some megabytes are through
        migrate(pair)
        restored_on(pair.switch_b)
        pair.vm_b.wait_for("GUEST-DONE", timeout=240)
        output = pair.vm_b.output()
        status_a, status_b = pair.switch_a.status(), pair.switch_b.status()
        print(f"A: {status_a['migration']['last']}; B: {status_b['migration']['last']}")
        if "RESETS=0" not in output:
            print(pair.switch_a.log(), pair.switch_b.log())
        assert "RESETS=0" in output, output
        assert f"DOWN={hashlib.sha256(blob).hexdigest()} BYTES={len(blob)}" in output, output
        assert "AFTER=small-answer" in output, output
        assert server_lines(server, 2) == [f"sent {len(blob)}", "sent small"]
        assert "connections are frozen while they move" in pair.switch_a.log()    # our helper said HELLO
        assert status_a["migration"]["last"]["tcp_moved"] >= 1, status_a["migration"]
        assert status_b["migration"]["last"]["tcp_moved"] >= 1, status_b["migration"]
        assert status_b["migration"]["last"]["tcp_reset"] == 0, status_b["migration"]
        assert not any(w["restarts"] for w in status_b["workers"] + status_a["workers"])


def test_tcp_stream_moves_to_another_host(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """Two hosts: switch B runs in a twin of the host namespace (same interface, MAC and addresses, as
    passt requires of two hosts) and the stream comes from a server upstream; once the migration ended the
    upstream reaches the host's addresses on the twin.  The stream completes whole, never reset, and a new
    connection goes through B."""
    need_qemu10()
    netns.add_twin()
    blob, server = start_stream_server(netns, tmp_path, upstream=True)
    with two_switches(tmp_path, netns, guest_image, stream_script(netns.server_addr), helpers=True,
                      twin=True) as pair:
        pair.vm_a.wait_for("STREAMING", timeout=240)
        time.sleep(3)
        migrate(pair)
        netns.move_to_twin()
        restored_on(pair.switch_b)
        pair.vm_b.wait_for("GUEST-DONE", timeout=240)
        output = pair.vm_b.output()
        if "RESETS=0" not in output:
            print(pair.switch_a.log(), pair.switch_b.log())
        assert "RESETS=0" in output, output
        assert f"DOWN={hashlib.sha256(blob).hexdigest()} BYTES={len(blob)}" in output, output
        assert "AFTER=small-answer" in output, output
        assert server_lines(server, 2) == [f"sent {len(blob)}", "sent small"]
        status_b = pair.switch_b.status()
        assert status_b["migration"]["last"]["tcp_moved"] >= 1, status_b["migration"]
        assert status_b["migration"]["last"]["tcp_reset"] == 0, status_b["migration"]


def test_tcp_reset_without_repair_helper(tmp_path: Path, netns: TestNetns, guest_image: GuestImage) -> None:
    """Acceptance 3: without a repair helper the guest's connection is reset (it sees the RST as soon as it
    runs on B), the reset is counted and logged, and new connections work."""
    need_qemu10()
    _blob, server = start_stream_server(netns, tmp_path)
    with two_switches(tmp_path, netns, guest_image, stream_script(), helpers=False) as pair:
        pair.vm_a.wait_for("STREAMING", timeout=240)
        time.sleep(2)
        migrate(pair)
        ended = time.monotonic()
        pair.vm_b.wait_for("STREAM-END", timeout=30)
        took = time.monotonic() - ended
        pair.vm_b.wait_for("GUEST-DONE", timeout=120)
        output = pair.vm_b.output()
        print(f"guest saw the reset {took:.1f} s after the migration ended")
        assert re.search(r"RESETS=[1-9]", output), output
        assert "AFTER=small-answer" in output, output
        assert took < 10, output
        status_a, status_b = pair.switch_a.status(), pair.switch_b.status()
        assert status_a["migration"]["last"]["tcp_reset"] >= 1, status_a["migration"]
        assert status_b["migration"]["last"]["tcp_reset"] >= 1, status_b["migration"]
        assert "reset" in pair.switch_a.log() and "reset" in pair.switch_b.log()
        lines = server_lines(server, 2)
        assert lines[0].startswith("error") and lines[1] == "sent small", lines
