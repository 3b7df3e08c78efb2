"""The control socket's rendering for people: drops and events apart."""

from __future__ import annotations

from pathlib import Path

from shardswitch.coordinator.control import format_status


def test_status_shows_drops_and_events_apart() -> None:
    """A worker's drops (frames lost, by reason) and events (nothing lost) are listed on lines of their own."""
    worker = {"pair": 0, "pid": 42, "rings": [], "drops": {"RX_NO_BUFFERS": 2, "NOT_FOR_US": 1},
              "events": {"UDP_HOST_ICMP_ERROR": 3}}
    lines = format_status({"pid": 1, "workers": [worker, {"pair": 1, "pid": 43, "rings": []}]}).splitlines()
    assert "  dropped: NOT_FOR_US 1, RX_NO_BUFFERS 2" in lines
    assert "  events: UDP_HOST_ICMP_ERROR 3" in lines
    assert sum(1 for line in lines if line.startswith(("  dropped", "  events"))) == 2


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
