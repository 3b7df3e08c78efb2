"""The control socket (coordinator/control.py): its rendering for people, and its clients served without
holding the coordinator's loop, as a local client that dribbles, stalls or crowds the socket would try it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from shardswitch.coordinator.control import DEADLINE, MAX_CLIENTS, ControlError, format_status, query
from shardswitch.loglimit import BURST
from tests.switch import Switch
from tests.switchkit import serve_fresh_frontend, wait_until

#: What a stalled client is told when its deadline passes.
TOO_SLOW = b'{"error": "no complete request within %g s"}\n' % DEADLINE


def test_status_shows_drops_and_events_apart() -> None:
    """A worker's drops (frames lost, by reason) and events (nothing lost) are listed on lines of their own."""
    worker = {"pair": 0, "pid": 42, "rings": [], "drops": {"RX_NO_BUFFERS": 2, "NOT_FOR_US": 1},
              "events": {"UDP_HOST_ICMP_ERROR": 3}}
    lines = format_status({"pid": 1, "workers": [worker, {"pair": 1, "pid": 43, "rings": []}]}).splitlines()
    assert "  dropped: NOT_FOR_US 1, RX_NO_BUFFERS 2" in lines
    assert "  events: UDP_HOST_ICMP_ERROR 3" in lines
    assert sum(1 for line in lines if line.startswith(("  dropped", "  events"))) == 2


def test_flows_show_the_udp_timeout_each_flow_is_under() -> None:
    """`shardswitch flows`: a UDP flow's line says its idle timeout; a flow with none (TCP) says nothing."""
    from shardswitch.coordinator.control import format_flows

    side = {"pif": "guest", "ep_addr": "10.0.2.15", "ep_port": 5353, "our_addr": "10.0.2.2", "our_port": 53}
    flows = [{"index": 3, "type": "udp", "state": "active", "owner": 0, "age": 4.2, "timeout": 120, "sides": [side]},
             {"index": 4, "type": "tcp", "state": "active", "owner": 1, "age": 0.0, "timeout": None, "sides": []}]
    lines = format_flows({"capacity": 8, "flows": flows}).splitlines()
    assert lines[0] == "2 flow(s), table capacity 8"
    assert "age    4s  timeout 120s" in lines[1] and lines[1].endswith("guest 10.0.2.15:5353 > 10.0.2.2:53")
    assert "timeout" not in lines[2]


def test_rates_between_two_status_answers() -> None:
    """--watch: frames, bits and drops per second per pair and in all, ring states, a silent worker."""
    from shardswitch.coordinator.control import format_rates

    def worker(pair: int, frames: int, drops: int, answered: bool = True) -> dict[str, object]:
        return {"pair": pair, "tx_frames": frames, "tx_bytes": frames * 1000, "rx_frames": 2 * frames,
                "rx_bytes": 0, "drops": {"X": drops}, "flows": 3, "answered": answered,
                "rings": [{"state": "running"}, {"state": "broken"}]}

    before = {"workers": [worker(0, 0, 0), worker(1, 0, 0)]}
    after = {"version": "0.1.0", "pid": 7, "uptime": 61.0, "frontend": {"connected": True},
             "workers": [worker(0, 2000, 4), worker(1, 500, 0, answered=False)]}
    text = format_rates(before, after, 2.0)
    lines = text.splitlines()
    assert "front-end connected" in lines[0]
    assert lines[2].split()[:5] == ["0", "1.0", "kf/s", "8.0", "Mb/s"] and "running,broken" in lines[2]
    assert "2 f/s" in lines[2] and lines[3].endswith("not answering")
    assert lines[4].split()[:5] == ["all", "1.2", "kf/s", "10.0", "Mb/s"] and lines[4].split()[-1] == "6"


def test_watch_command(tmp_path: Path) -> None:
    """`shardswitch status --watch --count 2` prints two refreshes of a running switch and exits 0."""
    import subprocess
    import sys


    from tests.switch import Switch

    with Switch(tmp_path) as switch:
        done = subprocess.run([sys.executable, "-m", "shardswitch", "status", "--watch", "--interval", "0.2",
                               "--count", "2", "--control", switch.control], capture_output=True, text=True,
                              timeout=30, env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("from guest") == 2 and " all " in done.stdout


def connect(path: str) -> socket.socket:
    """A control client that has connected (waiting while the switch's queue of connections is full) and
    sent nothing yet; its reads time out generously."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(DEADLINE * 4)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """All the switch sends until it closes."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:                       # closed with bytes of ours unread: after its answer
        pass
    return data


def control_clients(switch: Switch) -> int:
    """Control clients the switch serves now, the one asking included."""
    return int(switch.status()["control"]["clients"])


def test_slow_client_holds_nobody(tmp_path: Path) -> None:
    """A client that sends its request a byte every 0.3 s: meanwhile another client's status comes back and
    a front-end completes its handshake (and gets an ARP answer), while the slow client is still
    connected."""
    with Switch(tmp_path) as switch:
        slow = connect(switch.control)
        stop = threading.Event()

        def dribble() -> None:
            for byte in b'{"cmd": "status", "pad": "' + b"x" * 200:
                if stop.wait(0.3):
                    return
                try:
                    slow.send(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=dribble)
        sender.start()
        try:
            assert control_clients(switch) == 2                 # the slow one is being served
            serve_fresh_frontend(switch, 1)
            assert control_clients(switch) == 2                 # and still is
        finally:
            stop.set()
            sender.join(10)
        assert read_to_end(slow) == TOO_SLOW
        slow.close()


def test_stalled_request_is_dropped_at_its_deadline(tmp_path: Path) -> None:
    """A client that sends half a request and waits is told so and closed at its deadline (counted, logged);
    the switch serves on."""
    with Switch(tmp_path) as switch:
        stalled = connect(switch.control)
        stalled.sendall(b'{"cmd": "sta')
        assert read_to_end(stalled) == TOO_SLOW
        stalled.close()
        assert switch.status()["control"]["refused"] == {"deadline": 1}
        assert "no complete request within" in switch.log()


def test_concurrent_clients_are_bounded(tmp_path: Path) -> None:
    """MAX_CLIENTS idle clients take every slot: one more is refused at once with a clear error; when one
    leaves, a client is served again; the idle ones are dropped at their deadline, the log lines about them
    rate-limited."""
    with Switch(tmp_path) as switch:
        idle = [connect(switch.control) for _ in range(MAX_CLIENTS - 1)]
        assert control_clients(switch) == MAX_CLIENTS            # all taken, the one asking included
        idle.append(connect(switch.control))                    # accepted before the next connection
        with pytest.raises(ControlError, match=f"busy: {MAX_CLIENTS} control clients at once"):
            query(switch.control, "status")
        idle.pop().close()
        status = wait_until(lambda: _status_unless_busy(switch.control), "a free slot", timeout=DEADLINE * 4)
        assert status["control"]["refused"].get("busy", 0) >= 1
        for sock in idle:
            assert read_to_end(sock) == TOO_SLOW
            sock.close()
        wait_until(lambda: switch.status()["control"]["refused"].get("deadline") == len(idle),
                   "the deadline drops to be counted", timeout=DEADLINE * 4)
        assert switch.log().count("no complete request within") <= BURST


def _status_unless_busy(path: str) -> dict[str, object] | None:
    """The status, or None while the control socket is busy."""
    try:
        return query(path, "status")
    except ControlError as err:
        if "busy" in str(err):
            return None
        raise
